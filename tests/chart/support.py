"""Rendering the chart with Helm's own code (helm-python-sdk), and small readers of what it
renders: objects by kind, pod specs, PromQL expressions of the alerts and the dashboard."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "dreambooth-operator"
PRODUCTION_VALUES = CHART_DIR / "values-production.yaml"
DASHBOARD_FILE = CHART_DIR / "dashboards" / "dreambooth.json"
RELEASE = "dreambooth-operator"
NAMESPACE = "dreambooth-system"
#: Kubernetes versions the rendered manifests must be valid for (Chart.yaml: kubeVersion)
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
#: kinds of prometheus-operator's CRDs (not in Kubernetes' OpenAPI: checked by promtool and
#: by their own tests here)
MONITORING_GROUP = "monitoring.coreos.com"

#: everything the chart can render, switched on (a list of namespaces, all monitoring)
EVERYTHING: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "crds": {"enabled": True, "keep": True},
    "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboard": {"enabled": True},
    "networkPolicy": {"enabled": True},
}
#: monitoring on, cluster-wide (the defaults otherwise)
MONITORING: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


@functools.cache
def chart():
    from helm_python import Chart

    return Chart.load(CHART_DIR)


@functools.cache
def _render(values_json: str, name: str, namespace: str) -> tuple[tuple[str, str], ...]:
    values = json.loads(values_json)
    return tuple(sorted(chart().render(values, name=name, namespace=namespace).items()))


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """template path -> rendered text (NOTES.txt included), as `helm template` would."""
    return dict(_render(json.dumps(values or {}, sort_keys=True), name, namespace))


def objects(values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (deep copies: tests may change them)."""
    out = []
    for path, text in render(values, **kw).items():
        if path.endswith(".txt"):
            continue
        out += [d for d in yaml.safe_load_all(text) if d]
    return copy.deepcopy(out)


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# --------------------------------------------------------------------------- PromQL


def alert_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rule = one(objects(values or MONITORING), "PrometheusRule")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return one(objects(values or MONITORING), "PrometheusRule")["spec"]["groups"]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels(board: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    for panel in (board or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


#: Grafana's variables, as a test Prometheus sees them (all jobs, a 5 minute rate window)
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$job": ".*",
}


def grafana_to_promql(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_queries(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) of every panel target."""
    return [(p["title"], grafana_to_promql(t["expr"])) for p in dashboard_panels(board) for t in p.get("targets", [])]


def variable_queries(board: dict[str, Any] | None = None) -> list[str]:
    """The series selectors inside the template variables' ``label_values(selector, label)``."""
    out = []
    for var in (board or dashboard())["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out.append(grafana_to_promql(match.group(1)))
    return out


_FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_quantile",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log2",
    "log10",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
}
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
}
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, label lists,
    ranges, functions and keywords removed). ``{__name__=...}`` selectors are refused."""
    assert "__name__" not in expr, f"select metrics by name, not by __name__: {expr!r}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call and (word in _FUNCTIONS or word in _AGGREGATIONS):
            continue
        if word.lower() in _KEYWORDS or word in _AGGREGATIONS:
            continue
        if re.fullmatch(r"[0-9]+[smhdwy]", word):
            continue
        names.add(word)
    return names


# --------------------------------------------------------------------------- tools


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed: run scripts/install-system-tools.sh "
            "(apt-get install --no-install-recommends prometheus)"
        )
    return path
