"""Debian's real Prometheus scrapes a live training run and an operator endpoint, with the
chart's PodMonitor relabelings and alert rules, and answers every dashboard query.

Prometheus runs on 127.0.0.1 with a 1 s scrape interval. The trainer target carries the
labels Kubernetes service discovery would give rank 0 of a trainer pod (and a second,
rank-1 target that the PodMonitor's keep rule must drop); the relabelings are the chart's
own, rendered by Helm. What a cluster adds that is not here: the service discovery itself
and prometheus-operator turning the monitors into this configuration.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
import yaml
from prometheus_client import start_http_server

from dreambooth.api import telemetry
from dreambooth.api.status import Phase
from dreambooth.operator import naming
from dreambooth.operator.metrics import OperatorMetrics
from kubesim.net import free_port
from tests.chart.support import (
    MONITORING,
    NAMESPACE,
    RELEASE,
    dashboard_queries,
    objects,
    one,
    require_tool,
    rule_groups,
    variable_queries,
)
from tests.support.trainer import (
    job_document,
    trainer_config,
    trainer_env,
    write_config,
)

JOB = "toy-cat"
JOB_NAMESPACE = "ml"
POD = f"{naming.trainer_name(JOB)}-0-abcde"
#: the PodMonitor's scrape job name, as prometheus-operator writes it
TRAINER_SCRAPE_JOB = f"podMonitor/{NAMESPACE}/{RELEASE}-trainers/0"


_TAKEN: set[int] = set()


def _meta(prefix: str, key: str) -> str:
    return prefix + "".join(c if c.isalnum() or c == "_" else "_" for c in key)


def _snake(relabeling: dict[str, Any]) -> dict[str, Any]:
    """A prometheus-operator RelabelConfig (camelCase) as Prometheus' relabel_config."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {keys.get(k, k): v for k, v in relabeling.items()}


def prometheus_config(trainer_port: int, idle_port: int, operator_port: int) -> dict[str, Any]:
    (endpoint,) = one(objects(MONITORING), "PodMonitor")["spec"]["podMetricsEndpoints"]
    service = one(objects(MONITORING), "Service")

    def pod_target(port: int, index: str, pod: str) -> dict[str, Any]:
        return {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "__meta_kubernetes_namespace": JOB_NAMESPACE,
                "__meta_kubernetes_pod_name": pod,
                _meta("__meta_kubernetes_pod_label_", naming.JOB_NAME_LABEL): JOB,
                _meta("__meta_kubernetes_pod_annotation_", naming.COMPLETION_INDEX_ANNOTATION): index,
            },
        }

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": TRAINER_SCRAPE_JOB,
                "metrics_path": endpoint["path"],
                "static_configs": [
                    pod_target(trainer_port, "0", POD),
                    pod_target(idle_port, "1", POD.replace("-0-", "-1-")),
                ],
                # what prometheus-operator puts first (namespace, pod), then the chart's own
                "relabel_configs": [
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    *[_snake(r) for r in endpoint["relabelings"]],
                ],
            },
            {
                "job_name": service["metadata"]["name"],  # the ServiceMonitor's job label
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{operator_port}"],
                        "labels": {"namespace": NAMESPACE, "pod": f"{RELEASE}-5d9f7-x2x4q"},
                    }
                ],
            },
        ],
    }


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, promql: str) -> list[dict[str, Any]]:
    return api(port, "query", query=promql)["result"]


def wait_for(what: str, check, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def operator_endpoint():
    metrics = OperatorMetrics()
    metrics.jobs.set(JOB_NAMESPACE, JOB, Phase.TRAINING)
    metrics.jobs.set(JOB_NAMESPACE, "old-cat", Phase.FAILED)
    metrics.reconcile_seconds.labels("poll").observe(0.02)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    port = server.server_address[1]
    _TAKEN.add(port)
    yield port
    server.shutdown()
    thread.join(5)


@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus")  # skip before anything starts


@pytest.fixture
def trainer_run(prometheus_binary, operator_endpoint, tmp_path, tiny_model_dir, toy_cat_dir):
    """A real tiny training run (file:// storage) serving rank 0's metrics; killed at the end.
    Yields (metrics port, process, log file)."""
    port = free_port()
    doc = job_document(
        tiny_model_dir.as_uri() + "/",
        toy_cat_dir.as_uri() + "/",
        (tmp_path / "output").as_uri() + "/",
        name=JOB,
        steps=2000,
        every=5,
    )
    config = write_config(trainer_config(doc, metrics_port=port), tmp_path / "trainer")
    log = tmp_path / "trainer.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dreambooth.trainer",
                "--config",
                str(config),
                "--workdir",
                str(tmp_path / "trainer" / "work"),
                "--termination-log",
                str(tmp_path / "termination"),
            ],
            env=trainer_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield port, proc, log
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@pytest.fixture
def prometheus(prometheus_binary, tmp_path, trainer_run, operator_endpoint):
    binary = prometheus_binary
    trainer_port = trainer_run[0]
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (folder / "prometheus.yml").write_text(
        yaml.safe_dump(prometheus_config(trainer_port, free_port(), operator_endpoint))
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for("prometheus to start", lambda: proc.poll() is None and api(port, "status/buildinfo"), 30)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stdout.read()


def test_prometheus_scrapes_training_and_operator_and_answers_the_dashboard(prometheus, trainer_run):
    port = prometheus
    _, trainer, log = trainer_run

    def step_series():
        assert trainer.poll() is None, log.read_text()
        found = query(port, f"{telemetry.STEP} > 0")
        return found if found and query(port, f"{telemetry.CHECKPOINT_UPLOAD_SECONDS}_count > 0") else None

    (step,) = wait_for("the trainer's steps in Prometheus", step_series, timeout=90)
    assert step["metric"]["dreambooth_job"] == JOB  # the PodMonitor's relabeling
    assert step["metric"]["namespace"] == JOB_NAMESPACE and step["metric"]["pod"] == POD
    assert step["metric"]["job"] == TRAINER_SCRAPE_JOB

    # rates need a few samples of every target
    wait_for("three scrapes of every target", lambda: len(query(port, "count_over_time(up[1m]) >= 3")) == 2)
    phases = {r["metric"]["phase"]: float(r["value"][1]) for r in query(port, "dreambooth_operator_jobs")}
    assert phases["Training"] == 1 and phases["Failed"] == 1 and phases["Succeeded"] == 0
    (training,) = query(port, f'{telemetry.PHASE}{{dreambooth_trainer_phase="training"}} == 1')
    assert training["metric"]["dreambooth_job"] == JOB

    # the PodMonitor's keep rule dropped rank 1: one trainer target; both targets are up
    # (a busy trainer may miss a 1 s scrape now and then: wait for a round where both answer)
    targets = api(port, "targets", state="active")["activeTargets"]
    trainer_targets = [t for t in targets if t["scrapePool"] == TRAINER_SCRAPE_JOB]
    assert [t["labels"]["pod"] for t in trainer_targets] == [POD]
    wait_for(
        "both targets up",
        lambda: {t["health"] for t in api(port, "targets", state="active")["activeTargets"]} == {"up"},
        timeout=30,
    )

    # every dashboard query runs; the per-job ones find the run (after two checkpoint uploads)
    wait_for(
        "two checkpoint uploads",
        lambda: query(
            port,
            f"{telemetry.CHECKPOINT_UPLOAD_SECONDS}_count >= 2"
            f" and changes({telemetry.CHECKPOINT_UPLOAD_SECONDS}_count[1m]) > 0",
        ),
    )
    optional = ("failures", "prior_loss", "errors_total")  # may have no series in a healthy run

    def queries_without_data() -> list[str]:
        return [
            f"{title}: {expr}"
            for title, expr in dashboard_queries() + [("variable", q) for q in variable_queries()]
            if not query(port, expr) and not any(word in expr for word in optional)
        ]

    deadline = time.monotonic() + 15
    while (empty := queries_without_data()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not empty, f"dashboard queries with no data during a run: {empty}"

    # the alert rules load and evaluate without errors; none fires during a healthy run
    rules = [r for g in api(port, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == 4, rules
    wait_for(
        "every rule evaluated",
        lambda: {r["health"] for g in api(port, "rules")["groups"] for r in g["rules"]} == {"ok"},
        timeout=30,
    )
    assert not [r["name"] for r in rules if r["state"] == "firing"]
