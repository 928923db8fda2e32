"""Monitoring: the ServiceMonitor, PodMonitor, PrometheusRule and Grafana dashboard.

- every metric a query uses is one our code exports (read from the registries of
  TrainerMetrics and OperatorMetrics, not from a list typed here);
- every label a query uses is exported by that code or set by the monitors' relabelings;
- every alert and dashboard query passes Debian's `promtool check rules`;
- `promtool test rules` unit-tests the alerts on synthetic series;
- the monitors select what the operator really creates (naming.py, resources.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.registry import CollectorRegistry

from dreambooth.api import telemetry, validate_job
from dreambooth.operator import naming, resources, trainerinputs
from dreambooth.operator.metrics import OperatorMetrics
from dreambooth.operator.settings import OperatorSettings
from dreambooth.trainer.metrics import TrainerMetrics
from tests.chart.support import (
    DASHBOARD_FILE,
    EVERYTHING,
    MONITORING,
    NAMESPACE,
    RELEASE,
    ROOT,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    metric_names,
    objects,
    of_kind,
    one,
    require_tool,
    rule_groups,
    variable_queries,
)

#: series Prometheus itself makes for every target
PROMETHEUS_SERIES = {"up"}
#: labels Prometheus or prometheus-operator put on every scraped series
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint", "service"}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "stateset": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Sample name -> label names, for every series the registry can export (labelled
    metrics included before any label value is used)."""
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        collector = registry._names_to_collectors.get(family.name) or registry._names_to_collectors.get(
            family.name + "_total"
        )
        labels |= set(getattr(collector, "_labelnames", ()) or ())
        if family.type == "histogram":
            labels.add("le")
        if family.type == "stateset":  # an Enum: one label named after the metric
            labels.add(family.name)
        for suffix in _SUFFIXES[family.type]:
            out[family.name + suffix] = labels
    return out


TRANSITIONS = "dreambooth_operator_job_phase_transitions_total"
EXPORTED = exported(TrainerMetrics().registry) | exported(OperatorMetrics().registry)


def podmonitor() -> dict[str, Any]:
    return one(objects(MONITORING), "PodMonitor")


def relabel_target_labels() -> set[str]:
    return {
        r["targetLabel"]
        for e in podmonitor()["spec"]["podMetricsEndpoints"]
        for r in e.get("relabelings", [])
        if r.get("targetLabel")
    }


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert, dashboard panel and dashboard variable."""
    return (
        [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        + [(f"panel {title}", expr) for title, expr in dashboard_queries()]
        + [("variable", expr) for expr in variable_queries()]
    )


# --------------------------------------------------------------------------- names


def test_the_registries_export_what_the_contract_names():
    for name in (
        telemetry.STEP,
        telemetry.LOSS,
        telemetry.IMAGES_PER_SECOND,
        telemetry.GPU_MEMORY_BYTES,
        telemetry.CHECKPOINT_UPLOAD_SECONDS + "_bucket",
        telemetry.CHECKPOINT_UPLOAD_FAILURES + "_total",
        telemetry.PHASE,
        "dreambooth_operator_jobs",
        "dreambooth_operator_reconcile_seconds_bucket",
        TRANSITIONS,
    ):
        assert name in EXPORTED, name
    assert EXPORTED[telemetry.PHASE] == {telemetry.PHASE}
    assert EXPORTED["dreambooth_operator_jobs"] == {"phase"}


def test_metric_names_reads_promql():
    assert metric_names('histogram_quantile(0.9, sum by (le, job) (rate(a_bucket{x="y"}[5m])))') == {"a_bucket"}
    assert metric_names('changes(a[900s]) == 0 and on (pod) (a offset 900s) and on (pod) (b{c="d"} == 1)') == {"a", "b"}
    assert metric_names('absent(up{job="x"} == 1)') == {"up"}
    assert metric_names("max by (namespace) (a) / max by (namespace) (b)") == {"a", "b"}


def test_every_metric_a_query_uses_is_exported_by_our_code():
    unknown = []
    for where, expr in all_queries():
        allowed = set(EXPORTED) | (PROMETHEUS_SERIES if where.startswith("alert") else set())
        unknown += [f"{where}: {name}" for name in metric_names(expr) - allowed]
    assert not unknown, f"metrics no code exports: {unknown}"


def test_every_label_a_query_uses_exists():
    known = {label for labels in EXPORTED.values() for label in labels}
    known |= TARGET_LABELS | relabel_target_labels()
    used_anywhere = set()
    for where, expr in all_queries():
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
        labels = set(re.findall(r"(\w+)\s*=~?|(\w+)\s*!~?", text.replace("==", "  ").replace("!=", "!~")))
        labels = {a or b for a, b in labels}
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
            labels |= {x.strip() for x in clause.split(",") if x.strip()}
        assert labels <= known, f"{where}: unknown labels {labels - known}"
        used_anywhere |= labels
    assert "dreambooth_job" in used_anywhere


def test_the_dashboard_shows_what_the_issue_asks_for():
    used = set()
    for _, expr in dashboard_queries():
        used |= metric_names(expr)
    for name in (
        "dreambooth_operator_jobs",  # jobs by phase
        telemetry.STEP,
        telemetry.TOTAL_STEPS,  # step progress per job
        telemetry.LOSS,  # loss per job
        telemetry.IMAGES_PER_SECOND,  # images/s
        telemetry.CHECKPOINT_UPLOAD_SECONDS + "_bucket",  # checkpoint upload time
        telemetry.GPU_MEMORY_BYTES,
    ):  # GPU memory
        assert name in used, name


def test_alerts_are_the_four_the_issue_names():
    assert [r["alert"] for r in alert_rules()] == [
        "DreamBoothJobStalled",
        "DreamBoothJobFailed",
        "DreamBoothOperatorDown",
        "DreamBoothCheckpointUploadFailing",
    ]
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_stall_window_follows_the_operators_stall_timeout():
    (stalled,) = [
        r
        for r in alert_rules({**MONITORING, "operator": {"stallTimeoutSeconds": 1800}})
        if r["alert"] == "DreamBoothJobStalled"
    ]
    assert "[1800s]" in stalled["expr"] and "offset 1800s" in stalled["expr"]


# --------------------------------------------------------------------------- promtool


def _write_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], check=False, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_alerts_and_every_dashboard_query(tmp_path):
    queries = [
        {"record": f"dreambooth_dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries() + [("variable", q) for q in variable_queries()])
    ]
    path = _write_rules(tmp_path, rule_groups() + [{"name": "dashboard", "rules": queries}])
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules()) + len(queries)} rules found" in done.stdout


def test_promtool_rejects_a_broken_query(tmp_path):
    """The check above is a real parse: a broken expression fails it."""
    path = _write_rules(tmp_path, [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (le (rate(x[5m]))"}]}])
    assert _promtool("check", "rules", str(path)).returncode != 0


OPERATOR_UP = {"job": f"{RELEASE}-metrics", "namespace": NAMESPACE}
TRAINER = {"namespace": "ml", "job": "dreambooth-system/dreambooth-operator-trainers"}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _trainer(job: str, step: str, phase: str = "training", minutes: int = 50) -> list[dict[str, str]]:
    labels = {**TRAINER, "pod": f"{job}-trainer-0-abcde", "dreambooth_job": job}
    out = [_series(telemetry.STEP, step, **labels)]
    for state in telemetry.TRAINER_PHASES:
        out.append(
            _series(telemetry.PHASE, f"{int(state == phase)}x{minutes}", **labels, dreambooth_trainer_phase=state)
        )
    return out


def _expected(alert: str, labels: dict[str, str], value: str = "0") -> dict[str, Any]:
    """A promtool exp_alerts entry: the labels, and the rule's annotations as Prometheus
    expands them for these labels and value (so the templates are tested too)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]

    def expand(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        text = re.sub(r"\{\{ \$value( \| humanize)? \}\}", value, text)
        assert "{{" not in text, text
        return text

    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {k: expand(v) for k, v in rule["annotations"].items()},
    }


def _stalled(job: str) -> dict[str, Any]:
    return _expected("DreamBoothJobStalled", {**TRAINER, "pod": f"{job}-trainer-0-abcde", "dreambooth_job": job})


def test_promtool_unit_tests_the_alerts(tmp_path):
    rules = _write_rules(tmp_path, rule_groups())
    tests = [
        {  # DreamBoothJobStalled (operator.stallTimeoutSeconds: 900)
            "interval": "1m",
            "input_series": [
                *_trainer("stuck", "0+1x10 10x40"),  # 10 steps, then none from minute 10
                *_trainer("fast", "0+1x50"),  # a step every minute
                *_trainer("prior", "0x50", phase="generating_class_images"),  # no steps, not training yet
                *_trainer("fresh", "_x19 5x30"),  # a new pod at minute 20, stuck at once
            ],
            "alert_rule_test": [
                {"eval_time": "24m", "alertname": "DreamBoothJobStalled", "exp_alerts": []},
                {"eval_time": "27m", "alertname": "DreamBoothJobStalled", "exp_alerts": [_stalled("stuck")]},
                {"eval_time": "34m", "alertname": "DreamBoothJobStalled", "exp_alerts": [_stalled("stuck")]},
                {
                    "eval_time": "40m",
                    "alertname": "DreamBoothJobStalled",
                    "exp_alerts": [_stalled("fresh"), _stalled("stuck")],
                },
            ],
        },
        {  # DreamBoothJobFailed: a job enters phase Failed at minute 11; the operator
            # restarts at minute 30 (its counter starts again at 0) and two more fail at 32
            "interval": "1m",
            "input_series": [
                _series(TRANSITIONS, "0x10 1x18 _ 0 2x15", phase="Failed", **OPERATOR_UP, pod="op-0"),
                _series(TRANSITIONS, "0+1x47", phase="Succeeded", **OPERATOR_UP, pod="op-0"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DreamBoothJobFailed", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "DreamBoothJobFailed",
                    "exp_alerts": [
                        _expected("DreamBoothJobFailed", {"phase": "Failed", **OPERATOR_UP, "pod": "op-0"}, "1")
                    ],
                },
                {"eval_time": "25m", "alertname": "DreamBoothJobFailed", "exp_alerts": []},
                {
                    "eval_time": "35m",
                    "alertname": "DreamBoothJobFailed",
                    "exp_alerts": [
                        _expected("DreamBoothJobFailed", {"phase": "Failed", **OPERATOR_UP, "pod": "op-0"}, "2")
                    ],
                },
            ],
        },
        {  # DreamBoothOperatorDown: scrapes fail from minute 11; 5 minutes later it fires
            "interval": "1m",
            "input_series": [_series("up", "1x10 0x20", **OPERATOR_UP)],
            "alert_rule_test": [
                {"eval_time": "14m", "alertname": "DreamBoothOperatorDown", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "DreamBoothOperatorDown",
                    "exp_alerts": [_expected("DreamBoothOperatorDown", {})],
                },
            ],
        },
        {  # ... and when the operator is not scraped at all
            "interval": "1m",
            "input_series": [_series("up", "1x30", job="something-else", namespace=NAMESPACE)],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "DreamBoothOperatorDown", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "DreamBoothOperatorDown",
                    "exp_alerts": [_expected("DreamBoothOperatorDown", {})],
                },
            ],
        },
        {  # DreamBoothCheckpointUploadFailing
            "interval": "1m",
            "input_series": [
                _series(
                    telemetry.CHECKPOINT_UPLOAD_FAILURES + "_total",
                    "0x10 1x60",
                    **TRAINER,
                    pod="cat-trainer-0-abcde",
                    dreambooth_job="cat",
                )
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DreamBoothCheckpointUploadFailing", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "DreamBoothCheckpointUploadFailing",
                    "exp_alerts": [
                        _expected(
                            "DreamBoothCheckpointUploadFailing",
                            {**TRAINER, "pod": "cat-trainer-0-abcde", "dreambooth_job": "cat"},
                            "1",
                        )
                    ],
                },
                {"eval_time": "60m", "alertname": "DreamBoothCheckpointUploadFailing", "exp_alerts": []},
            ],
        },
    ]
    test_file = tmp_path / "alerts-test.yaml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}, sort_keys=False)
    )
    done = subprocess.run(
        [require_tool("promtool"), "test", "rules", test_file.name],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


# --------------------------------------------------------------------------- monitors


def _trainer_job() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "toy-cat.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50")
    return resources.job(trainerinputs.TrainerInputs(validate_job(doc, cluster=True), OperatorSettings()))


def test_podmonitor_selects_the_trainer_pods_the_operator_creates():
    spec = podmonitor()["spec"]
    pod = _trainer_job()["spec"]["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[endpoint["port"]] == OperatorSettings().trainer_metrics_port
    assert spec["namespaceSelector"] == {"any": True}
    assert one(objects(EVERYTHING), "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def _meta(prefix: str, key: str) -> str:
    """Prometheus' Kubernetes SD label of a pod label or annotation."""
    return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_podmonitor_keeps_rank_0_and_labels_series_with_the_job_name():
    (endpoint,) = podmonitor()["spec"]["podMetricsEndpoints"]
    keep, job = endpoint["relabelings"]
    assert keep == {
        "action": "keep",
        "regex": "0",
        "sourceLabels": [_meta("__meta_kubernetes_pod_annotation_", naming.COMPLETION_INDEX_ANNOTATION)],
    }
    assert job == {
        "action": "replace",
        "targetLabel": "dreambooth_job",
        "sourceLabels": [_meta("__meta_kubernetes_pod_label_", naming.JOB_NAME_LABEL)],
    }


def test_servicemonitor_selects_the_operator_metrics_service():
    objs = objects(MONITORING)
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # the DreamBoothOperatorDown alert's job label is what prometheus-operator sets: the Service name
    (down,) = [r for r in alert_rules() if r["alert"] == "DreamBoothOperatorDown"]
    assert f'job="{service["metadata"]["name"]}"' in down["expr"]


#: the fields of prometheus-operator's monitoring.coreos.com/v1 kinds this chart writes
_FIELDS = {
    "ServiceMonitor": {
        "spec": {"selector", "namespaceSelector", "endpoints"},
        "endpoints": {"port", "path", "interval", "scrapeTimeout"},
    },
    "PodMonitor": {
        "spec": {"selector", "namespaceSelector", "podMetricsEndpoints"},
        "podMetricsEndpoints": {"port", "path", "interval", "scrapeTimeout", "relabelings"},
        "relabelings": {"action", "sourceLabels", "targetLabel", "regex"},
    },
    "PrometheusRule": {
        "spec": {"groups"},
        "groups": {"name", "rules"},
        "rules": {"alert", "expr", "for", "labels", "annotations"},
    },
}


def test_monitoring_objects_use_only_prometheus_operator_fields():
    objs = [o for o in objects(EVERYTHING) if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(o["kind"] for o in objs) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]

    def check(node: Any, key: str, fields: dict[str, set[str]], where: str) -> None:
        if isinstance(node, list):
            for item in node:
                check(item, key, fields, where)
            return
        if key in fields and isinstance(node, dict):
            assert set(node) <= fields[key], f"{where}.{key}: unknown fields {set(node) - fields[key]}"
            for name, value in node.items():
                check(value, name, fields, f"{where}.{key}")

    for obj in objs:
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # additionalLabels
        check(obj["spec"], "spec", _FIELDS[obj["kind"]], obj["kind"])
        for duration in re.findall(r"(?:interval|scrapeTimeout|for): (\S+)", yaml.safe_dump(obj["spec"])):
            assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", duration), duration


# --------------------------------------------------------------------------- dashboard


def test_dashboard_configmap_follows_the_sidecar_convention():
    (config_map,) = [o for o in of_kind(objects(MONITORING), "ConfigMap")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["dreambooth.json"]) == dashboard()
    custom = objects(
        {"grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"}}}
    )
    (config_map,) = of_kind(custom, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = list(dashboard_panels(board))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            if telemetry.PREFIX in target["expr"]:  # per-job panels follow the variables
                assert 'namespace=~"$namespace"' in target["expr"] and 'dreambooth_job=~"$job"' in target["expr"]
    assert DASHBOARD_FILE.read_text().endswith("\n")
