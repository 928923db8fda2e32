"""A local cluster for end-to-end tests: :class:`LocalCluster`.

Everything that can be real on one machine is; the rest is a visible stand-in::

    real, unmodified            the operator: python -m dreambooth.operator (kopf), a subprocess
                                the trainer: python -m dreambooth.trainer or the operator's
                                  accelerate launch script, as the pods' processes
                                S3: SeaweedFS `weed mini` (s3server.py), the minio SDK
                                Prometheus: Debian's, scraping trainer pods and the operator
                                kubectl: apply --validate=false, patch, delete, get
    emulated                    the Kubernetes API (kube_emulator.py: kmock + fixes, over HTTP)
    stood in for, in the test   JobController (kube_controllers.py): pods of Indexed Jobs,
                                  backoffLimit, podFailurePolicy, suspend
                                ProcessKubelet (cluster_kubelet.py, cluster_container.py):
                                  runs each pod's container as a local process
                                GarbageCollector (kube_controllers.py): ownerReference cascade
                                Prometheus' Kubernetes discovery (cluster_prometheus.py)

The controllers run in one :class:`~tests.support.kube_controllers.ControllerLoop` thread,
after every change in the API and every 0.2 s: the cluster is "live" without the test
driving it. The test acts as a user (apply, patch, delete) or as the infrastructure
failing (``kubelet.kill``). docs/testing.md lists what differs from a real cluster.

Usage (see tests/e2e/)::

    with LocalCluster(workdir, s3_server) as cluster:
        cluster.upload_example_inputs(tiny_model_dir, photos_dir)
        cluster.apply(toy_cat_manifest(cluster.s3_endpoint))
        cluster.wait_phase("toy-cat", "Succeeded", timeout=120)
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from dreambooth.trainer.storage import S3Settings, open_storage
from tests.support.cluster_kubelet import PodProcess, ProcessKubelet, describe
from tests.support.cluster_prometheus import Prometheus, prometheus_binary
from tests.support.kube import Kube, running_kube
from tests.support.kube_controllers import ControllerLoop, GarbageCollector, JobController
from tests.support.net import free_port
from tests.support.procs import stop_process
from tests.support.s3server import S3Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "toy-cat.yaml"
NAMESPACE = "default"
CREDENTIALS_SECRET = "minio-credentials"  # what examples/toy-cat.yaml names
#: the buckets examples/toy-cat.yaml reads from (s3://models/sd15/, s3://training-data/toy-cat/)
MODEL_URI = "s3://models/sd15/"
PHOTOS_URI = "s3://training-data/toy-cat/"
#: tiny settings for the example: a CPU and a random 64-pixel model (what the test changes)
#: (about 50 steps/s here: 200 steps leave several status updates to see on the way)
TINY: dict[str, Any] = {
    "training": {"steps": 200, "batchSize": 1, "resolution": 64, "learningRate": 1e-3},
    "checkpointing": {"everySteps": 40, "keep": 2},
    "validation": {"everySteps": 100, "inferenceSteps": 2, "imagesPerPrompt": 1},
    "resources": {"gpusPerNode": 0},
}

_TAKEN: set[int] = set()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, recursively (dicts merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def toy_cat_manifest(s3_endpoint: str, *, name: str = "toy-cat",
                     **spec_changes: Any) -> dict[str, Any]:
    """examples/toy-cat.yaml as a user applies it, with what this machine needs changed:
    the storage endpoint (no cluster DNS for minio.minio.svc) and :data:`TINY` training
    settings (plus ``spec_changes``). The example's S3 URIs stay as they are."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["storage"]["endpoint"] = s3_endpoint
    doc["spec"] = merge(merge(doc["spec"], TINY), spec_changes)
    if doc["spec"]["validation"].get("enabled") is False:  # a disabled feature takes no settings
        doc["spec"]["validation"] = copy.deepcopy(spec_changes["validation"])
    return doc


class Operator:
    """``python -m dreambooth.operator`` as a process, its log kept (and echoed if asked)."""

    def __init__(self, env: dict[str, str], log: Path,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.env, self.log, self.on_line = env, log, on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dreambooth.operator"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._pump = threading.Thread(target=self._copy, args=(self.proc,), daemon=True)
        self._pump.start()

    def _copy(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log.open("ab") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                if self.on_line is not None:
                    self.on_line(raw.decode(errors="replace").rstrip("\n"))

    def stop(self) -> None:
        stop_process(self.proc)
        if self._pump is not None:
            self._pump.join(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class StatusRecorder:
    """Keeps every distinct ``.status`` each DreamBoothJob had: the emulator calls it as it
    stores each write (``Kube.on_change``), so none is missed, the last one included.
    ``on_change(name, status)`` is called for each (on the emulator's loop: keep it quick)."""

    def __init__(self, kube: Kube, on_change: Callable[[str, dict[str, Any]], None] | None = None):
        self.kube, self.on_change = kube, on_change
        self.history: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __call__(self, resource: tuple[str, str, str], kind: str, obj: dict[str, Any],
                 old: dict[str, Any] | None) -> None:
        status = obj.get("status")
        if resource[2] != "dreamboothjobs" or kind == "DELETED" or not status:
            return
        name, status = obj["metadata"]["name"], copy.deepcopy(status)
        with self._lock:
            seen = self.history.setdefault(name, [])
            if seen and seen[-1] == status:
                return
            seen.append(status)
        if self.on_change is not None:
            self.on_change(name, status)

    def of(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.history.get(name, []))


class LocalCluster:
    """The API emulator, the controllers' stand-ins, the operator, Prometheus (where it is
    installed) and a fresh output bucket on ``s3_server``; a context manager.

    ``echo(source, line)``: live output of the operator, the pods and kubectl (the demo
    prints it); ``watchers``: more objects whose ``step()`` runs after every change;
    ``prometheus``: None = where installed, True = required, False = never. The
    credentials Secret (:data:`CREDENTIALS_SECRET`) is created unless ``credentials=False``."""

    def __init__(self, workdir: Path, s3_server: S3Server, *, credentials: bool = True,
                 prometheus: bool | None = None, echo: Callable[[str, str], None] | None = None,
                 watchers: Sequence[Any] = (), poll_seconds: int = 1,
                 grace_seconds: int = 30) -> None:
        self.workdir, self.s3 = workdir, s3_server
        self.with_credentials = credentials
        self.want_prometheus = prometheus
        self.echo = echo
        self.watchers = list(watchers)  # more objects with step(), run in the ControllerLoop
        self.poll_seconds, self.grace_seconds = poll_seconds, grace_seconds
        self.bucket = f"e2e-{uuid.uuid4().hex[:12]}"
        self.s3_endpoint = s3_server.endpoint
        self.settings = S3Settings(endpoint=s3_server.endpoint, secure=False, region="us-east-1",
                                   access_key=s3_server.access_key, secret_key=s3_server.secret_key)
        self.trainer_metrics_port = free_port()
        self.operator_metrics_port = free_port()
        self.kube: Kube
        self.kubelet: ProcessKubelet
        self.jobs: JobController
        self.recorder: StatusRecorder
        self.operator: Operator
        self.prometheus: Prometheus | None = None
        self.loop: ControllerLoop
        self.applied_with: str | None = None  # "kubectl" or "api", set by the tests
        self._stack = contextlib.ExitStack()

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _say(self, source: str, text: str) -> None:
        if self.echo is not None:
            self.echo(source, text)

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        client = self.s3.client()
        client.make_bucket(self.bucket)
        self._stack.callback(self._remove_bucket, self.bucket)
        (self.workdir / "kube").mkdir(exist_ok=True)
        self.kube = self._stack.enter_context(running_kube(self.workdir / "kube"))
        if self.with_credentials:
            self.create_credentials_secret()

        self.kubelet = ProcessKubelet(self.kube, self.workdir / "pods",
                                      max_grace=self.grace_seconds,
                                      on_line=lambda pod, line: self._say(pod, line))
        self.jobs = JobController(self.kube)
        self.recorder = StatusRecorder(self.kube)
        self._stack.callback(self.kube.on_change(self.recorder))
        controllers: list[Any] = [self.jobs, GarbageCollector(self.kube), self.kubelet]
        binary = prometheus_binary() if self.want_prometheus is not False else None
        if self.want_prometheus and binary is None:
            raise RuntimeError("prometheus is not installed (scripts/install-system-tools.sh)")
        if binary is not None:
            self.prometheus = Prometheus(self.kube, self.workdir / "prometheus", free_port(),
                                         self.operator_metrics_port)
            self.prometheus.start(binary)
            self._stack.callback(self.prometheus.stop)
            controllers.append(self.prometheus)

        self.loop = ControllerLoop(self.kube, *controllers, *self.watchers, interval=0.2)
        self._stack.callback(self.kubelet.shutdown)  # after the loop has stopped (LIFO)
        self._stack.callback(self.loop.stop)
        self.loop.start()

        env = {
            **self.kube.env,
            "PYTHONUNBUFFERED": "1",
            "DREAMBOOTH_POLL_INTERVAL_SECONDS": str(self.poll_seconds),
            "DREAMBOOTH_METRICS_PORT": str(self.operator_metrics_port),
            "DREAMBOOTH_HEALTH_PORT": str(free_port()),
            "DREAMBOOTH_TRAINER_METRICS_PORT": str(self.trainer_metrics_port),
            "DREAMBOOTH_OUTPUT_ROOT": f"s3://{self.bucket}",
            "DREAMBOOTH_S3_ENDPOINT": self.s3_endpoint,
            "DREAMBOOTH_S3_SECURE": "false",
            "DREAMBOOTH_CREDENTIALS_SECRET": CREDENTIALS_SECRET,
            "DREAMBOOTH_TERMINATION_GRACE_SECONDS": str(self.grace_seconds),
        }
        self.operator = Operator(env, self.workdir / "operator.log",
                                 on_line=lambda line: self._say("operator", line))
        self.operator.start()
        self._stack.callback(self.operator.stop)
        # kopf is ready once it watches the resource (its second GET after the initial list)
        self.wait_for(lambda: sum(1 for m, p in self.kube.requests
                                  if m == "GET" and "dreamboothjobs" in p) >= 2,
                      timeout=60, what="the operator to watch dreamboothjobs")

    def _remove_bucket(self, bucket: str) -> None:
        with contextlib.suppress(Exception):
            open_storage(f"s3://{bucket}/", self.settings).delete_prefix("")
            self.s3.client().remove_bucket(bucket)

    # -- acting as a user -------------------------------------------------------------

    def create_credentials_secret(self, name: str = CREDENTIALS_SECRET) -> None:
        """The Secret a cluster admin creates: the S3 keys under the names the operator
        maps to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
        self.kube.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": name, "namespace": NAMESPACE},
                          "data": {"AWS_ACCESS_KEY_ID": _b64(self.s3.access_key),
                                   "AWS_SECRET_ACCESS_KEY": _b64(self.s3.secret_key)}})

    def upload_example_inputs(self, model_dir: Path, photos_dir: Path) -> None:
        """Put the base model and the photos where examples/toy-cat.yaml expects them
        (buckets ``models`` and ``training-data``, created if missing)."""
        client = self.s3.client()
        for uri, folder in ((MODEL_URI, model_dir), (PHOTOS_URI, photos_dir)):
            bucket = uri.split("/")[2]
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            storage = open_storage(uri, self.settings)
            if not storage.list():  # once per S3 server: the inputs never change
                storage.upload_dir(folder)

    def apply(self, manifest: Mapping[str, Any]) -> str:
        """``kubectl apply --validate=false -f <file>`` where kubectl is installed (the API
        emulator serves no OpenAPI to validate against), else a create through the API.
        Returns which of the two was used."""
        path = self.workdir / f"{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
        if shutil.which("kubectl"):
            self._say("kubectl", f"kubectl apply --validate=false -f {path.name}")
            done = self.kube.kubectl("apply", "--validate=false", "-f", str(path))
            self._say("kubectl", done.stdout.strip())
            self.applied_with = "kubectl"
        else:
            self._say("kubectl", f"(no kubectl here) POST {path.name} to the API")
            self.kube.create(manifest)
            self.applied_with = "api"
        return self.applied_with

    def patch(self, name: str, spec: Mapping[str, Any]) -> None:
        """``kubectl patch dbj <name> --type merge -p {"spec": ...}`` (or the API)."""
        body = {"spec": dict(spec)}
        if shutil.which("kubectl"):
            done = self.kube.kubectl("patch", "dbj", name, "--type", "merge", "-p",
                                     json.dumps(body))
            self._say("kubectl", done.stdout.strip())
        else:
            self.kube.patch("dbj", NAMESPACE, name, body)

    def delete(self, name: str) -> None:
        """``kubectl delete dbj <name> --wait=false`` (through the API without kubectl)."""
        if shutil.which("kubectl"):
            done = self.kube.kubectl("delete", "dbj", name, "--wait=false")
            self._say("kubectl", done.stdout.strip())
        else:
            self.kube.delete("dbj", NAMESPACE, name)

    # -- observing --------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        return (self.kube.find("dbj", NAMESPACE, name) or {}).get("status") or {}

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every distinct status the job had, oldest first."""
        return self.recorder.of(name)

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.kube.list("Pod", NAMESPACE, labels={"dreambooth.io/job-name": name})

    def processes(self, name: str) -> list[PodProcess]:
        """Every trainer process started for the job, oldest first."""
        prefix = f"{name}-trainer-"
        return [r for r in self.kubelet.history if r.name.startswith(prefix)]

    def logs(self, name: str) -> str:
        return "\n".join(r.log() for r in self.processes(name))

    def output(self, name: str) -> Any:
        """The job's output prefix in S3 (a :class:`dreambooth.trainer.storage.Storage`)."""
        return open_storage(f"s3://{self.bucket}/{NAMESPACE}/{name}/", self.settings)

    def keys(self, name: str) -> set[str]:
        return {o.key for o in self.output(name).list()}

    def explain(self, name: str | None = None) -> str:
        """Status, operator log and trainer logs: for assertion messages."""
        parts = []
        if name:
            parts.append(f"status: {yaml.safe_dump(self.status(name))}")
        parts.append(f"operator log (end):\n{self.operator.output()[-4000:]}")
        runs = self.processes(name) if name else self.kubelet.history
        parts.append(describe(runs))
        return "\n".join(parts)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60,
                 what: str = "condition", name: str | None = None) -> Any:
        """``kube.wait_for`` that also fails fast when a controller stand-in broke."""
        def check() -> Any:
            if self.loop_error() is not None:
                raise AssertionError(f"the controller loop failed: {self.loop_error()!r}")
            return predicate()

        try:
            return self.kube.wait_for(check, timeout=timeout, what=what)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{self.explain(name)}") from None

    def loop_error(self) -> BaseException | None:
        loop = getattr(self, "loop", None)
        return getattr(loop, "_error", None)

    def wait_phase(self, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
        self.wait_for(lambda: self.status(name).get("phase") == phase, timeout=timeout,
                      what=f"{name} in phase {phase}", name=name)
        return self.status(name)

    def ready_condition(self, name: str) -> dict[str, Any]:
        """The Ready condition (its reason and message are the status' headline), or {}."""
        return next((c for c in self.status(name).get("conditions") or ()
                     if c["type"] == "Ready"), {})

    def checkpoint_steps(self, name: str) -> list[int]:
        """Steps of the complete checkpoints (a manifest written last marks one)."""
        return sorted(int(k.split("/")[1].split("-")[1]) for k in self.keys(name)
                      if k.startswith("checkpoints/") and k.endswith("/manifest.json"))


def sleep_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` (for things outside the API, e.g. processes): its value or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
