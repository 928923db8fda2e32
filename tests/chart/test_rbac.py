"""RBAC: dreambooth/operator/rbac.py grants exactly what the operator's code calls, and the
chart renders exactly rbac.py's rules.

The operator's needs are derived from the code itself, not typed again here:
- kube.py: every kubernetes_asyncio method it touches, mapped to (group, resource, verb)
  through the request path and HTTP method in kubernetes_asyncio's generated source;
- handlers.py: the kopf handlers on the DreamBoothJob resource (kopf lists, watches and
  patches it), the status it writes and the Events it posts;
- resources.py: owner references with blockOwnerDeletion need update on .../finalizers;
- kopf itself: the selectors in kopf's source for Events, CRDs and namespaces.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kopf._cogs.structs import references
from kubernetes_asyncio import client

from dreambooth.api import crd, validate_job
from dreambooth.api.job import GROUP, PLURAL
from dreambooth.api.sweep import PLURAL as SWEEPS
from dreambooth.api.sweep import plan, validate_sweep
from dreambooth.api.sweep_runs import child_job
from dreambooth.operator import handlers, kube, rbac, resources, sweeps, trainerinputs
from dreambooth.operator.settings import OperatorSettings
from tests.chart.support import (
    EVERYTHING,
    NAMESPACE,
    RELEASE,
    ROOT,
    objects,
    of_kind,
    one,
    production_values,
)

Triple = tuple[str, str, str]

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def _module_ast(module) -> ast.Module:
    return ast.parse(Path(inspect.getsourcefile(module)).read_text())


def _api_classes(tree: ast.Module) -> dict[str, type]:
    """``self.core = client.CoreV1Api(api)`` in Kube.__init__ -> {"core": CoreV1Api}."""
    out = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Attribute)
            and isinstance(node.targets[0].value, ast.Name)
            and node.targets[0].value.id == "self"
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and isinstance(node.value.func.value, ast.Name)
            and node.value.func.value.id == "client"
            and node.value.func.attr.endswith("Api")
        ):
            out[node.targets[0].attr] = getattr(client, node.value.func.attr)
    return out


def _request(api: type, method: str) -> tuple[str, str]:
    """(path template, HTTP method) of a kubernetes_asyncio API method, from its source."""
    source = inspect.getsource(getattr(api, f"{method}_with_http_info"))
    match = re.search(r"call_api\(\s*'([^']+)',\s*'(\w+)'", source)
    assert match, f"cannot find the request of {api.__name__}.{method}"
    return match.group(1), match.group(2)


def _triple(path: str, http: str, params: dict[str, str], watch: bool = False) -> Triple:
    for key, value in params.items():
        path = path.replace("{" + key + "}", value)
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]  # namespaces/{namespace}/<plural>...
    plural, named, sub = rest[0], len(rest) > 1, rest[2:]
    resource = "/".join([plural, *sub])
    if http == "GET":
        verb = "watch" if watch else ("get" if named else "list")
    elif http == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = _VERBS[http]
    return group, resource, verb


def _resolve(node: ast.expr, module) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
        return getattr(module, node.id)
    return None


def kube_calls(module=kube, expected=frozenset({"core", "batch", "custom"})) -> Iterator[tuple[str, Triple]]:
    """(api.method, (group, resource, verb)) for every API method ``module`` (the operator's
    kube.py, or the gallery's) uses."""
    tree = _module_ast(module)
    apis = _api_classes(tree)
    assert set(apis) >= expected, apis
    # (call, its arguments for the API method): a direct call, or a wrapper that takes the
    # method first and passes the other arguments on (e.g. ``self._raw(self.core.x, ns)``)
    calls: dict[int, tuple[ast.Call, list[ast.expr]]] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            calls[id(n.func)] = (n, n.args)
            if n.args:
                calls.setdefault(id(n.args[0]), (n, n.args[1:]))
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr in apis
        ):
            continue
        api, method = apis[node.value.attr], node.attr
        path, http = _request(api, method)
        params: dict[str, str] = {}
        call, args = calls.get(id(node), (None, []))
        watch = False
        if call is not None:
            names = list(inspect.signature(getattr(api, method)).parameters)[1:]
            for name, arg in zip(names, args, strict=False):
                if (value := _resolve(arg, module)) is not None:
                    params[name] = value
            watch = any(k.arg == "watch" and isinstance(k.value, ast.Constant) and k.value.value for k in call.keywords)
        unresolved = {p for p in re.findall(r"\{(\w+)\}", path) if p not in ("namespace", "name")} - set(params)
        assert not unresolved, f"{method}: cannot tell {unresolved} from the call"
        yield f"{api.__name__}.{method}", _triple(path, http, params, watch)


def handler_needs() -> set[Triple]:
    """What kopf does for the handlers registered in handlers.py."""
    # handlers.py registers into a registry of its own: kopf's default one also holds those
    # of any operator another test ran in-process (and kopf run may have replaced it)
    registry, default = kopf.OperatorRegistry(), kopf.get_default_registry()
    kopf.set_default_registry(registry)
    try:
        importlib.reload(handlers)
    finally:
        kopf.set_default_registry(default)
    # handlers that make kopf keep state on the object (annotations, finalizers)
    stateful = {h.selector for h in registry._changing.get_all_handlers()} | {
        h.selector for h in registry._spawning.get_all_handlers()
    }
    watching = {h.selector for h in registry._watching.get_all_handlers()}
    assert stateful | watching, "no kopf handlers registered"
    needs: set[Triple] = set()
    for selector in stateful | watching:
        served = selector.plural or selector.any_name
        assert (selector.group, served) in ((GROUP, PLURAL), (GROUP, SWEEPS)), selector
        needs |= {(GROUP, served, "list"), (GROUP, served, "watch")}  # kopf lists + watches what it serves
    if stateful:
        needs.add((GROUP, PLURAL, "patch"))  # kopf patches its own annotations on it
    source = inspect.getsource(handlers)
    has_status = "status" in crd.crd()["spec"]["versions"][0]["subresources"]
    if re.search(r"""patch\[["']status["']\]""", source) and has_status:
        needs.add((GROUP, f"{PLURAL}/status", "patch"))  # kopf patches /status separately
    if "kopf.event(" in source or "settings.posting" in source:
        events = references.EVENTS  # what kopf's poster posts to: core v1 events
        needs.add((events.group, events.any_name, "create"))
    return needs


def owner_needs() -> set[Triple]:
    doc = yaml.safe_load((ROOT / "examples" / "toy-cat.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50")
    inputs = trainerinputs.TrainerInputs(validate_job(doc, cluster=True), OperatorSettings())
    needs = set()
    for child in resources.children(inputs):
        for ref in child["metadata"].get("ownerReferences", []):
            if ref.get("blockOwnerDeletion"):
                assert ref["apiVersion"].split("/")[0] == GROUP
                needs.add((GROUP, f"{PLURAL}/finalizers", "update"))
    # a sweep's runs and its comparison Job are owned by the sweep
    sweep = validate_sweep(
        yaml.safe_load((ROOT / "examples" / "sweep-object.yaml").read_text())
        | {"metadata": {"name": "study", "namespace": "team-a", "uid": "6b1d8a52-0c3e-4f7a-9d2b-1e5f3a4c7b80"}}
    )
    the_plan = plan(sweep.spec)
    for child in (
        child_job(sweep, the_plan.runs[0], the_plan, "s3://b/"),
        sweeps.compare_job(sweep, OperatorSettings()),
    ):
        for ref in child["metadata"].get("ownerReferences", []):
            if ref.get("blockOwnerDeletion"):
                needs.add((GROUP, f"{SWEEPS}/finalizers", "update"))
    return needs


# --------------------------------------------------------------------------- code vs rbac.py


def test_kube_py_calls_are_mapped_to_permissions():
    calls = dict(kube_calls())
    assert calls["CoreV1Api.create_namespaced_config_map"] == ("", "configmaps", "create")
    assert calls["BatchV1Api.read_namespaced_job"] == ("batch", "jobs", "get")
    assert calls["CustomObjectsApi.delete_namespaced_custom_object"] == (GROUP, PLURAL, "delete")


def test_rbac_grants_exactly_what_the_operator_code_uses():
    needed = {t for _, t in kube_calls()} | handler_needs() | owner_needs()
    granted = rbac.triples(rbac.OPERATOR)
    assert granted - needed == set(), "granted but never used: remove from rbac.py"
    assert needed - granted == set(), "used but not granted: add to dreambooth/operator/rbac.py"


def test_kopf_cluster_permissions_are_the_resources_kopf_observes():
    assert kopf.__version__.startswith("1.45"), "re-check kopf's RBAC needs (rbac.py docstring)"
    crds, namespaces = references.CRDS, references.NAMESPACES
    assert rbac.triples(rbac.KOPF_CLUSTER) == {(crds.group, crds.any_name, v) for v in ("list", "watch")}
    assert rbac.triples(rbac.KOPF_NAMESPACES) == {(namespaces.group, namespaces.any_name, v) for v in ("list", "watch")}
    observation = inspect.getsource(__import__("kopf._core.reactor.observation", fromlist=["x"]))
    assert "references.CRDS" in observation and "references.NAMESPACES" in observation
    # namespaces are listed only for a list of namespaces: "not clusterwide"
    assert "not settings.scanning.disabled and not clusterwide" in observation


# --------------------------------------------------------------------------- chart vs rbac.py


def _normalized(rules: list[dict[str, Any]]) -> list[str]:
    return sorted(
        json.dumps({k: sorted(v) if k != "verbs" else v for k, v in r.items()}, sort_keys=True) for r in rules
    )


def _rule_triples(rules: list[dict[str, Any]]) -> set[Triple]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_committed_rbac_template_is_generated_from_rbac_py():
    assert (ROOT / rbac.TEMPLATE).read_text() == rbac.render_template(), "run `make crds`"


@pytest.mark.parametrize(
    "values",
    [{}, {"storage": {"endpoint": "minio:9000"}, "serviceMonitor": {"enabled": True}}],
    ids=["defaults", "other values"],
)
def test_cluster_wide_chart_renders_rbac_py_rules(values):
    objs = objects(values)
    assert not of_kind(objs, "Role") and not of_kind(objs, "RoleBinding")
    role, binding = one(objs, "ClusterRole"), one(objs, "ClusterRoleBinding")
    assert _normalized(role["rules"]) == _normalized(rbac.policy_rules(rbac.cluster_wide()))
    assert _rule_triples(role["rules"]) == rbac.triples(rbac.cluster_wide())
    assert ("", "namespaces", "list") not in _rule_triples(role["rules"])  # kopf does not list them cluster-wide
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]


@pytest.mark.parametrize("values", [EVERYTHING, production_values()], ids=["everything", "production"])
def test_namespaced_chart_renders_a_role_per_namespace_and_only_reads_cluster_wide(values):
    objs = objects(values)
    role_rules, cluster_rules = rbac.namespaced()
    roles, bindings = of_kind(objs, "Role"), of_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(values["watchNamespaces"])
    for role in roles:
        assert _normalized(role["rules"]) == _normalized(rbac.policy_rules(role_rules))
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    (cluster_role,) = of_kind(objs, "ClusterRole")
    assert _normalized(cluster_role["rules"]) == _normalized(rbac.policy_rules(cluster_rules))
    assert {verb for _, _, verb in _rule_triples(cluster_role["rules"])} <= {"get", "list", "watch"}
    (cluster_binding,) = of_kind(objs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_rbac_create_false_renders_no_rbac():
    objs = objects({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert not [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")]
    assert not of_kind(objs, "ServiceAccount")
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
