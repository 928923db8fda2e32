"""Debian's Prometheus scraping the trainer pods that the process kubelet runs.

Debian builds Prometheus without Kubernetes service discovery (``kubernetes_sd_configs`` is
not in its config schema), so :class:`Prometheus` stands in for the discovery part only:
its ``step()`` (run it in the :class:`~kubesim.controllers.ControllerLoop`)
lists the pods in the API and writes one ``file_sd`` target per named container port of
every running pod, labelled with the ``__meta_kubernetes_pod_*`` labels Kubernetes
discovery would give it. The relabelings are the chart's PodMonitor's (selector
``app.kubernetes.io/name=dreambooth, app.kubernetes.io/component=trainer``, port
``metrics``, only completion index 0, ``dreambooth_job`` from the job-name label), plus the
``namespace`` and ``pod`` labels prometheus-operator adds. The operator's own ``/metrics``
is a static target (the ServiceMonitor's job).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubesim.kube import Kube
from kubesim.procs import stop_process

TRAINER_JOB = "dreambooth-trainers"  # scrape job of the trainer pods (the PodMonitor's)
OPERATOR_JOB = "dreambooth-operator"  # the ServiceMonitor's
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _meta(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", key)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def trainer_relabelings() -> list[dict[str, Any]]:
    """The chart's PodMonitor (charts/dreambooth-operator/templates/podmonitor.yaml) as
    Prometheus relabel_configs, as prometheus-operator would generate them."""
    selector = {"app.kubernetes.io/name": "dreambooth", "app.kubernetes.io/component": "trainer"}
    keep_selector = [
        {"action": "keep", "source_labels": [_meta("__meta_kubernetes_pod_label_", k)], "regex": v}
        for k, v in selector.items()
    ]
    return [
        *keep_selector,
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        # the chart's own: only rank 0 serves /metrics; one label per DreamBoothJob
        {
            "action": "keep",
            "source_labels": [_meta("__meta_kubernetes_pod_annotation_", INDEX_ANNOTATION)],
            "regex": "0",
        },
        {
            "action": "replace",
            "source_labels": [_meta("__meta_kubernetes_pod_label_", "dreambooth.io/job-name")],
            "target_label": "dreambooth_job",
        },
    ]


def pod_targets(pods: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups for running pods, as Kubernetes pod discovery labels them."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        common = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": status["podIP"],
            "__meta_kubernetes_pod_phase": status["phase"],
        }
        for key, value in (meta.get("labels") or {}).items():
            common[_meta("__meta_kubernetes_pod_label_", key)] = value
            common[_meta("__meta_kubernetes_pod_labelpresent_", key)] = "true"
        for key, value in (meta.get("annotations") or {}).items():
            common[_meta("__meta_kubernetes_pod_annotation_", key)] = value
            common[_meta("__meta_kubernetes_pod_annotationpresent_", key)] = "true"
        for container in pod["spec"].get("containers") or ():
            for port in container.get("ports") or ():
                groups.append(
                    {
                        "targets": [f"{status['podIP']}:{port['containerPort']}"],
                        "labels": {
                            **common,
                            "__meta_kubernetes_pod_container_name": container["name"],
                            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                            "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                        },
                    }
                )
    return groups


class Prometheus:
    """``prometheus`` on 127.0.0.1 with a 1 s scrape interval; ``step()`` refreshes its
    trainer targets from the API."""

    def __init__(self, kube: Kube, folder: Path, port: int, operator_metrics_port: int | None):
        self.kube, self.folder, self.port = kube, folder, port
        self.operator_metrics_port = operator_metrics_port
        self.targets_file = folder / "trainer-pods.json"
        self._last: list[dict[str, Any]] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        scrape = [
            {
                "job_name": TRAINER_JOB,
                "metrics_path": "/metrics",
                "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
                "relabel_configs": trainer_relabelings(),
            }
        ]
        if self.operator_metrics_port:
            scrape.append(
                {"job_name": OPERATOR_JOB, "static_configs": [{"targets": [f"127.0.0.1:{self.operator_metrics_port}"]}]}
            )
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape,
        }

    def start(self, binary: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_targets([])
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=(self.folder / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + self.log())
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready:\n" + self.log())

    def log(self) -> str:
        path = self.folder / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def _write_targets(self, groups: list[dict[str, Any]]) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file
        self._last = groups

    def step(self) -> None:
        """Service discovery's part: the running pods as targets (rewritten on change)."""
        if self.proc is None:
            return
        groups = pod_targets(self.kube.list("Pod"))
        if groups != self._last:
            self._write_targets(groups)

    # -- queries -----------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(body)
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def wait_for(self, promql: str, check: Any, timeout: float = 15) -> list[dict[str, Any]]:
        """Query until ``check(result)`` is true (a scrape lands every second; a series is
        first stored a few seconds after its target appears)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: {result} within {timeout}s\n{self.log()}")
            time.sleep(0.5)

    def samples(self, selector: str, window: str = "10m") -> list[tuple[float, float]]:
        """Every stored (time, value) of the series ``selector`` picks, oldest first."""
        found = self.query(f"{selector}[{window}]")
        return sorted((float(t), float(v)) for series in found for t, v in series["values"])
