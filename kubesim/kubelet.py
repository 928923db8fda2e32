"""A kubelet that runs pods as local processes: :class:`ProcessKubelet`.

The :class:`~kubesim.controllers.Kubelet` stand-in only *writes* pod states. This
one runs each pod's container for real, as a node would, with what one machine without
containers allows (:mod:`kubesim.container` sets a container up: volumes as
folders, paths rewritten, Secrets resolved, DNS names of pods replaced by their IPs). Each
difference from a real cluster is listed in docs/testing.md.

* **Pod IPs**: every pod gets its own, ``127.0.0.2``, ``127.0.0.3``, ... (all of
  127.0.0.0/8 is loopback on Linux), written to ``status.podIP`` with phase Running.
* **Start**: a pod whose Secret, ConfigMap or key is missing stays Pending with
  ``CreateContainerConfigError`` and the kubelet's message; every pass retries it, so
  creating the Secret starts it. A pod of a Job index whose previous pod's processes are
  still stopping waits (what ``podReplacementPolicy: Failed`` ensures in a cluster).
* **Late starts**: :meth:`ProcessKubelet.hold_pull` holds the image pull of the next pods
  (of one Job index, or any): such a pod stays Pending, its container waiting with
  ``ContainerCreating`` as while a kubelet pulls an image, for the given seconds after the
  kubelet first sees it, then starts. A test starts one pod of a job late this way.
* **Processes**: ``command`` + ``args`` run in a new session. The container is every
  process that inherits its marker variable (:data:`CONTAINER_MARKER`): when the main
  process ends, the rest are killed, as a container's PID namespace goes with its PID 1
  (torchrun starts each worker in a session of its own: a process group alone would let a
  killed pod's workers train on). Output goes to
  ``<pod folder>/log`` (and to ``on_line``). Exit code: the process's, or 128 + signal.
  Termination message: the file's first 4096 bytes, else, with ``FallbackToLogsOnError``
  and a non-zero exit, the log's last 80 lines / 2048 bytes, as a kubelet does. Reason
  ``Completed`` or ``Error`` (no memory limits: never ``OOMKilled``).
* **Deletion**: the emulator deletes objects at once, a real API server waits for the
  kubelet. So this kubelet puts a finalizer (:data:`FINALIZER`) on every pod whose process
  it starts: a deleted pod lives on with a ``deletionTimestamp`` while the kubelet sends
  SIGTERM to the main process, waits up to ``terminationGracePeriodSeconds`` (capped by
  ``max_grace``), SIGKILLs the group, then removes the finalizer. A deleted pod's final
  state is not written: the Job controller stand-in would count it as a failure, which
  the real one does not do for the pods it deletes itself (suspend).

``step()`` is one pass over all pods (run it from a
:class:`~kubesim.controllers.ControllerLoop`); :meth:`kill` stands in for a
process dying (``kill -9``, a node's OOM killer).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubesim.api import ApiError
from kubesim.container import (
    Container,
    ContainerConfigError,
    Network,
    prepare,
)
from kubesim.controllers import INDEX, Kubelet
from kubesim.kube import Kube, NotFound
from kubesim.net import free_port

FINALIZER = "e2e.dreambooth.io/process-kubelet"
#: in every container's environment (value: the pod's uid): how its processes are found
CONTAINER_MARKER = "E2E_POD_UID"
MESSAGE_BYTES = 4096  # a real kubelet keeps at most 4096 bytes of the termination message
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError: the log's tail
_PR_SET_PDEATHSIG = 1


@dataclass
class PodProcess:
    """One pod's container, running (or done) as a local process."""

    namespace: str
    name: str
    uid: str
    index: str | None  # the Job completion index
    job_uid: str | None
    hostname: tuple[str, str]  # (spec.hostname, spec.subdomain): its DNS name
    ip: str
    folder: Path
    container: Container
    proc: subprocess.Popen[bytes]
    started_at: float = 0.0  # time.monotonic() when the process started
    ended_at: float | None = None  # ... and when it was seen to have ended (reaped)
    term_sent_at: float | None = None
    exit_code: int | None = None
    reported: bool = False
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def argv(self) -> list[str]:
        return self.container.argv

    @property
    def env(self) -> dict[str, str]:
        return self.container.env

    @property
    def log_path(self) -> Path:
        return self.folder / "log"

    @property
    def running(self) -> bool:
        return self.exit_code is None and not _has_exited(self.proc)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has ended, without reaping it: while it is a zombie its process
    group id cannot be reused, so killing the group afterwards is safe."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the thread that started it ends (no orphans)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


@dataclass
class PullHold:
    """The next ``times`` pods (of Job completion index ``index``, or any) wait ``seconds``
    for their image."""

    seconds: float
    index: str | None
    times: int

    def takes(self, pod: Mapping[str, Any]) -> bool:
        index = (pod["metadata"].get("annotations") or {}).get(INDEX)
        return self.times > 0 and self.index in (None, index)


class ProcessKubelet:
    """Runs every pod of the emulator as a local process (see the module's docstring).

    ``root``: where pod folders go. ``on_line(pod_name, line)``: called for every line a
    container prints (live output). ``max_grace``: the longest SIGTERM grace period.
    ``extra_env``: added to every container (e.g. diagnostics switches)."""

    def __init__(
        self,
        kube: Kube,
        root: Path,
        *,
        max_grace: float = 60.0,
        on_line: Callable[[str, str], None] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ):
        self.kube, self.root = kube, root
        self.max_grace, self.on_line = max_grace, on_line
        self.extra_env = dict(extra_env or {})
        self.states = Kubelet(kube)  # writes pod statuses as a kubelet does
        self.processes: dict[str, PodProcess] = {}  # pod uid -> its process, while it exists
        self.history: list[PodProcess] = []  # every process ever started, in order
        self.network = Network(resolve=self._resolve, host_port=self._host_port)
        self._waiting: dict[str, tuple[str, str]] = {}  # pod uid -> Pending reason written
        self._holds: list[PullHold] = []
        self._pulling: dict[str, float] = {}  # pod uid -> when its held image pull ends
        self._next_ip = 2
        self._ports: dict[tuple[str, str], int] = {}  # (job uid, port name) -> host port
        self._lock = threading.RLock()

    # -- the public surface -----------------------------------------------------------

    def step(self) -> None:
        """One pass: start new pods, report finished ones, stop deleted ones."""
        with self._lock:
            pods = self.kube.list("Pod")
            for pod in sorted(pods, key=self._order):
                self._sync(pod)
            live = {p["metadata"]["uid"] for p in pods}
            for uid in self._pulling.keys() - live:
                del self._pulling[uid]
            for uid, run in list(self.processes.items()):
                if uid not in live:  # the pod is gone (after its finalizer was removed)
                    if run.running:  # only without our finalizer: never, but be safe
                        self._kill_group(run)
                    del self.processes[uid]

    reconcile = step

    def process(self, pod_name: str, namespace: str = "default") -> PodProcess | None:
        """The (latest) process of a pod, by pod name."""
        with self._lock:
            runs = [r for r in self.history if (r.namespace, r.name) == (namespace, pod_name)]
        return runs[-1] if runs else None

    def running(self, prefix: str = "") -> list[PodProcess]:
        """Processes still running, of pods whose name starts with ``prefix``."""
        with self._lock:
            return [r for r in self.history if r.name.startswith(prefix) and r.running]

    def hold_pull(self, seconds: float, *, index: int | str | None = None, times: int = 1) -> None:
        """Start the next ``times`` pods of Job completion index ``index`` (None: any pod)
        ``seconds`` late: each stays Pending with its container waiting in
        ``ContainerCreating`` (a slow image pull on a fresh node) from when this kubelet
        first sees it."""
        with self._lock:
            self._holds.append(PullHold(seconds, None if index is None else str(index), times))

    def kill(self, run: PodProcess, sig: int = signal.SIGKILL) -> None:
        """What ``kill -9 <pid>`` does to a container's main process: it dies, the pod
        fails with exit code 128 + 9, and the Job controller decides what comes next."""
        os.kill(run.pid, sig)

    def shutdown(self) -> None:
        """Kill every process still running (the end of a test)."""
        with self._lock:
            for run in self.history:
                if run.exit_code is None:
                    self._exited(run)  # SIGKILL to the group, then reaped
            for run in self.history:
                if run.reader is not None:
                    run.reader.join(5)

    # -- the network ------------------------------------------------------------------

    def _resolve(self, namespace: str, hostname: str, subdomain: str) -> str | None:
        for run in reversed(list(self.processes.values())):
            if run.namespace == namespace and run.hostname == (hostname, subdomain):
                return run.ip
        return None

    def _host_port(self, job_uid: str, port_name: str) -> int:
        return self._ports.setdefault((job_uid, port_name), free_port())

    # -- one pod ----------------------------------------------------------------------

    @staticmethod
    def _order(pod: Mapping[str, Any]) -> tuple[str, int, str]:
        """Index 0 first: other pods of a Job name it (rendezvous)."""
        meta = pod["metadata"]
        index = (meta.get("annotations") or {}).get(INDEX, "0")
        return meta["namespace"], int(index) if index.isdigit() else 0, meta["creationTimestamp"]

    def _sync(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        run = self.processes.get(meta["uid"])
        if run is not None and run.exit_code is None and _has_exited(run.proc):
            self._exited(run)
        if meta.get("deletionTimestamp"):
            if run is not None and run.exit_code is None:
                self._terminate(run)
            if run is None or run.exit_code is not None:
                self._release(pod)
        elif run is not None:
            if run.exit_code is not None and not run.reported:
                self._report(pod, run)
        elif status.get("phase") not in ("Succeeded", "Failed"):
            if self._pull_held(pod):
                self._pending(pod, "ContainerCreating", "")
                return
            try:
                self._start(pod)
            except ContainerConfigError as err:
                self._pending(pod, err.reason, err.message)

    def _pull_held(self, pod: Mapping[str, Any]) -> bool:
        """Whether ``pod``'s image pull is held (a hold applies to a pod once, when first seen)."""
        uid = pod["metadata"]["uid"]
        if uid not in self._pulling:
            hold = next((h for h in self._holds if h.takes(pod)), None)
            if hold is None:
                self._pulling[uid] = 0.0
                return False
            hold.times -= 1
            self._pulling[uid] = time.monotonic() + hold.seconds
        return time.monotonic() < self._pulling[uid]

    def _pending(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        uid = pod["metadata"]["uid"]
        if self._waiting.get(uid) != (reason, message):  # written once, not every pass
            self._waiting[uid] = (reason, message)
            try:
                self.states.pending(pod, reason=reason, message=message)
            except NotFound:
                pass

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = _ref(pod)
        index = (meta.get("annotations") or {}).get(INDEX)
        job_uid = next((o["uid"] for o in meta.get("ownerReferences") or () if o.get("kind") == "Job"), None)
        if job_uid is not None and any(
            r.running and r.job_uid == job_uid and r.index == index for r in self.processes.values()
        ):
            raise ContainerConfigError("ContainerCreating")  # the old pod is still stopping
        ip = f"127.0.0.{self._next_ip}"
        folder = self.root / ns / name
        container = prepare(
            self.kube,
            pod,
            folder,
            ip,
            self.network,
            extra_env=self.extra_env,
            host_ip=self.states.host_ip,
            max_grace=self.max_grace,
        )
        # everything resolved: from here on this kubelet owns the pod's lifecycle
        try:
            self.kube.patch("Pod", ns, name, {"metadata": {"finalizers": [*(meta.get("finalizers") or ()), FINALIZER]}})
        except (NotFound, ApiError):
            return  # deleted meanwhile: nothing to run
        self._next_ip += 1
        container.materialise()
        container.env[CONTAINER_MARKER] = meta["uid"]
        started = time.monotonic()
        proc = subprocess.Popen(
            container.argv,
            env=container.env,
            cwd=container.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
        )
        run = PodProcess(
            namespace=ns,
            name=name,
            uid=meta["uid"],
            index=index,
            job_uid=job_uid,
            hostname=(spec.get("hostname") or name, spec.get("subdomain") or ""),
            ip=ip,
            folder=folder,
            container=container,
            proc=proc,
            started_at=started,
        )
        run.reader = threading.Thread(target=self._pump, args=(run,), daemon=True, name=f"log-{name}")
        run.reader.start()
        self.processes[meta["uid"]] = run
        self.history.append(run)
        self._waiting.pop(meta["uid"], None)
        self.states.run(pod, ip=ip)

    def _pump(self, run: PodProcess) -> None:
        assert run.proc.stdout is not None
        with run.log_path.open("wb") as out:
            for raw in run.proc.stdout:
                out.write(raw)
                out.flush()
                if self.on_line is not None:
                    self.on_line(run.name, raw.decode(errors="replace").rstrip("\n"))

    # -- endings ----------------------------------------------------------------------

    def _exited(self, run: PodProcess) -> None:
        self._kill_group(run)  # the container's other processes end with its main one
        code = run.proc.wait()  # reaped only now: the group id stayed ours until here
        run.ended_at = time.monotonic()
        run.exit_code = code if code >= 0 else 128 - code
        if run.reader is not None:
            run.reader.join(10)

    def _message(self, run: PodProcess) -> str:
        try:
            raw = run.container.termination_path.read_bytes()[:MESSAGE_BYTES]
        except OSError:
            raw = b""
        text = raw.decode(errors="replace")
        if not text.strip() and run.container.fallback_to_logs and run.exit_code:
            tail = "\n".join(run.log().splitlines()[-FALLBACK_LINES:]).encode()
            text = tail[-FALLBACK_BYTES:].decode(errors="replace")
        return text.strip()

    def _report(self, pod: Mapping[str, Any], run: PodProcess) -> None:
        code = run.exit_code or 0
        try:
            self.states.terminate(pod, code, "Completed" if code == 0 else "Error", self._message(run))
        except NotFound:
            pass
        run.reported = True
        self._release(pod)

    def _terminate(self, run: PodProcess) -> None:
        """SIGTERM to the main process once; SIGKILL to the group after the grace period."""
        if run.term_sent_at is None:
            run.term_sent_at = time.monotonic()
            try:
                os.kill(run.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif time.monotonic() - run.term_sent_at >= run.container.grace_seconds:
            self._kill_group(run)
        if _has_exited(run.proc):
            self._exited(run)

    @staticmethod
    def _kill_group(run: PodProcess) -> None:
        """SIGKILL for every process of the container: its process group, and whatever else
        carries its marker (processes that started sessions of their own)."""
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for _ in range(5):  # again, for what forked meanwhile
            left = [pid for pid in container_pids(run.uid) if pid != run.pid]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _release(self, pod: Mapping[str, Any]) -> None:
        finalizers = pod["metadata"].get("finalizers") or []
        if FINALIZER in finalizers:
            try:
                self.kube.patch(
                    "Pod", *_ref(pod), {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER] or None}}
                )
            except NotFound:
                pass


def container_pids(pod_uid: str) -> list[int]:
    """The live processes (not zombies) whose environment carries the container marker of
    pod ``pod_uid``."""
    marker = f"{CONTAINER_MARKER}={pod_uid}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as env:
                if marker not in env.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue
        except (OSError, IndexError):
            continue
        found.append(int(entry.name))
    return found


def describe(runs: Iterable[PodProcess], tail: int = 3000) -> str:
    """The processes and the ends of their logs, for assertion messages."""
    return "\n".join(
        f"--- pod {r.namespace}/{r.name} ip {r.ip} pid {r.pid} exit {r.exit_code}\n"
        f"{' '.join(r.argv)[:400]}\n{r.log()[-tail:]}"
        for r in runs
    )


__all__ = [
    "CONTAINER_MARKER",
    "FINALIZER",
    "ContainerConfigError",
    "PodProcess",
    "ProcessKubelet",
    "PullHold",
    "container_pids",
    "describe",
]
