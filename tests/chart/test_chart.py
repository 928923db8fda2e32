"""The Helm chart, checked with Helm's own code (helm-python-sdk: lint, schema, render) and
Kubernetes' own schemas (kubernetes-validate, strict, Kubernetes 1.29-1.33)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dreambooth.api import crd, crd_sweep
from dreambooth.operator import naming
from dreambooth.operator.settings import PREFIX, OperatorSettings
from tests.chart.support import (
    CHART_DIR,
    EVERYTHING,
    KUBE_VERSIONS,
    MONITORING,
    MONITORING_GROUP,
    NAMESPACE,
    RELEASE,
    ROOT,
    chart,
    container_env,
    objects,
    of_kind,
    one,
    production_values,
    render,
)

VALUE_SETS = {
    "defaults": {},
    "production": production_values(),
    "everything": EVERYTHING,
    "cluster-wide monitoring": MONITORING,
    "gallery cluster-wide": {"gallery": {"enabled": True}, "storage": {"credentialsSecret": "minio"}},
    "gallery namespaced": {**EVERYTHING, "gallery": {"enabled": True, "credentialsSecret": "minio-readonly"}},
}


# --------------------------------------------------------------------------- lint + render


@pytest.mark.parametrize("kube", ["v1.29.0", "v1.33.0"])
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict_passes(name, kube):
    from helm_python import lint

    report = lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version=kube)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is info ("icon is recommended")
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_manifest_is_valid_for_kubernetes_1_29_to_1_33(name):
    objs = objects(VALUE_SETS[name])
    assert objs
    checked = set()
    for obj in objs:
        if obj["apiVersion"].split("/")[0] == MONITORING_GROUP:
            continue  # prometheus-operator's kinds: tests/chart/test_monitoring.py
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(
                    f"{obj['kind']} {obj['metadata']['name']} is invalid for "
                    f"Kubernetes {version}: {err.message} at {list(err.path)}"
                ) from None
        checked.add(obj["kind"])
    assert {"Deployment", "ServiceAccount"} <= checked


def test_kubernetes_validate_is_strict_here():
    """The check above would catch a misplaced field (unknown fields are errors)."""
    deployment = one(objects(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_defaults_render_the_operator_and_nothing_optional():
    kinds = sorted(o["kind"] for o in objects())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]


def test_everything_renders_each_optional_object():
    kinds = {o["kind"] for o in objects(EVERYTHING)}
    assert kinds >= {
        "CustomResourceDefinition",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
    }


def test_every_namespaced_object_says_its_namespace():
    for obj in objects(EVERYTHING):
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']}"


def test_chart_version_matches_the_project():
    meta = chart().metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"]
    assert meta["name"] == RELEASE


# --------------------------------------------------------------------------- the CRD


GENERATED = (crd, crd_sweep)  # the DreamBoothJob's and the DreamBoothSweep's CRD modules


@pytest.mark.parametrize("module", GENERATED, ids=lambda m: m.CRD_FILE)
def test_chart_crd_folder_holds_the_generated_crd(module):
    """Helm's crds/ copy is byte-identical to crds/ at the root and to what the types generate."""
    entries = {e["name"]: e for e in chart().crds}
    assert set(entries) == {f"crds/{m.CRD_FILE}" for m in GENERATED}
    entry = entries[f"crds/{module.CRD_FILE}"]
    generated = module.render()
    assert (CHART_DIR / "crds" / module.CRD_FILE).read_text() == generated, "run `make crds`"
    assert (ROOT / "crds" / module.CRD_FILE).read_text() == generated, "run `make crds`"
    assert entry["data"] == generated or yaml.safe_load(entry["data"]) == module.crd()


def templated_crds(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in of_kind(objects(values), "CustomResourceDefinition")}


def test_crds_enabled_templates_the_same_crds_with_the_release_labels():
    templated = templated_crds({"crds": {"enabled": True}})
    assert set(templated) == {m.CRD_NAME for m in GENERATED}
    for module in GENERATED:
        one_crd = templated[module.CRD_NAME]
        assert one_crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        labels = one_crd["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert one_crd["spec"] == module.crd()["spec"]


def test_crds_keep_false_lets_uninstall_delete_the_crd():
    templated = templated_crds({"crds": {"enabled": True, "keep": False}})
    assert len(templated) == len(GENERATED)
    assert all("annotations" not in c["metadata"] for c in templated.values())


def test_crds_folder_is_the_default_and_not_templated():
    assert not of_kind(objects(), "CustomResourceDefinition")
    assert chart().values["crds"] == {"enabled": False, "keep": True}


# --------------------------------------------------------------------------- values + schema


def test_schema_is_strict_at_every_level():
    """Every object node either lists its properties with additionalProperties: false or is a
    map of strings/quantities, or a Kubernetes object passed through (affinity parts, env)."""
    passthrough = {
        "/global",
        "/affinity/nodeAffinity",
        "/affinity/podAffinity",
        "/affinity/podAntiAffinity",
        "/operator/extraEnv/items",
        "/networkPolicy/metricsFrom/items/namespaceSelector",
        "/networkPolicy/metricsFrom/items/podSelector",
        "/networkPolicy/metricsFrom/items/ipBlock",
    }

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and path not in passthrough:
            assert "additionalProperties" in node, f"{path or '/'}: no additionalProperties"
            if "properties" in node:
                assert node["additionalProperties"] is False, f"{path}: not strict"
        for name, prop in (node.get("properties") or {}).items():
            assert prop.get("description") or path.endswith("/items"), f"{path}/{name}: no description"
            walk(prop, f"{path}/{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}/items")

    walk(chart().schema, "")


def _schema_leaves(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if node.get("type") == "object" and "properties" in node:
        out = []
        for name, prop in node["properties"].items():
            out += _schema_leaves(prop, path + (name,))
        return out
    return [path]


def _documented_keys() -> set[tuple[str, ...]]:
    """Key paths of values.yaml preceded by a ``# --`` comment block."""
    documented, stack, commented = set(), [], False
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            commented = True
            continue
        if stripped.startswith("#") or not stripped:
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2)]
        if commented:
            documented.add(tuple(stack))
        commented = False
    return documented


def test_every_value_is_documented_in_values_yaml():
    documented = _documented_keys()
    missing = []
    for leaf in _schema_leaves(chart().schema):
        if leaf == ("global",):
            continue
        if not any(leaf[:i] in documented for i in range(1, len(leaf) + 1)):
            missing.append(".".join(leaf))
    assert not missing, f"undocumented values (add a '# --' comment): {missing}"


def test_values_yaml_and_schema_have_the_same_keys():
    def keys(node: Any, schema: dict[str, Any], path: str) -> None:
        if not isinstance(node, dict) or "properties" not in schema:
            return
        extra = set(node) - set(schema["properties"])
        assert not extra, f"{path}: {extra} in values.yaml but not in the schema"
        missing = set(schema["properties"]) - set(node) - {"global"}
        assert not node or not missing, f"{path}: {missing} in the schema but not in values.yaml"
        for name, value in node.items():
            keys(value, schema["properties"][name], f"{path}.{name}")

    keys(chart().values, chart().schema, "values")
    chart().validate_schema(chart().values)
    chart().validate_schema(production_values())


@pytest.mark.parametrize(
    ("values", "path", "says"),
    [
        ({"imagee": {"tag": "1"}}, "at ''", "additional properties 'imagee' not allowed"),
        ({"serviceMonitor": {"enabeld": True}}, "at '/serviceMonitor'", "'enabeld' not allowed"),
        ({"serviceMonitor": {"enabled": "yes"}}, "at '/serviceMonitor/enabled'", "got string, want boolean"),
        ({"operator": {"pollIntervalSeconds": "10"}}, "at '/operator/pollIntervalSeconds'", "got string, want integer"),
        ({"operator": {"pollIntervalSeconds": 0}}, "at '/operator/pollIntervalSeconds'", "minimum"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces'", "got string, want array"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'", "does not match pattern"),
        ({"storage": {"outputRoot": "gs://bucket"}}, "at '/storage/outputRoot'", "does not match pattern"),
        ({"storage": {"endpoint": "http://minio:9000"}}, "at '/storage/endpoint'", "does not match pattern"),
        ({"trainer": {"metricsPort": 29500}}, "at '/trainer/metricsPort'", "'not' failed"),
        ({"trainer": {"image": {"pullPolicy": "Always"}}}, "at '/trainer/image'", "'pullPolicy' not allowed"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'", ""),
        (
            {"operator": {"extraEnv": [{"name": "DREAMBOOTH_NAMESPACES", "value": "x"}]}},
            "at '/operator/extraEnv/0/name'",
            "'not' failed",
        ),
        ({"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}, "at '/tolerations/0'", "'efect' not allowed"),
        ({"trainer": {"env": [{"name": "HOME", "value": "/root"}]}}, "at '/trainer/env/0/name'", "'not' failed"),
        (
            {"trainer": {"env": [{"name": "NCCL DEBUG", "value": "INFO"}]}},
            "at '/trainer/env/0/name'",
            "does not match pattern",
        ),
        ({"trainer": {"env": [{"name": "NCCL_DEBUG"}]}}, "at '/trainer/env/0'", "missing property 'value'"),
        (
            {"trainer": {"env": [{"name": "HF_TOKEN", "valueFrom": {}}]}},
            "at '/trainer/env/0'",
            "'valueFrom' not allowed",
        ),
        ({"trainer": {"env": {"NCCL_DEBUG": "INFO"}}}, "at '/trainer/env'", "got object, want array"),
        ({"trainer": {"extraResources": {"cpu": 4}}}, "invalid propertyName 'cpu'", ""),
        ({"trainer": {"extraResources": {"nvidia.com/gpu": 1}}}, "invalid propertyName 'nvidia.com/gpu'", ""),
        (
            {"trainer": {"extraResources": {"rdma/hca": "500m"}}},
            "at '/trainer/extraResources/rdma~1hca'",
            "'oneOf' failed",
        ),
    ],
)
def test_schema_rejects_bad_values_naming_the_path(values, path, says):
    from helm_python import HelmValuesError

    with pytest.raises(HelmValuesError) as err:
        chart().validate_schema(values)
    assert path in str(err.value) and says in str(err.value), str(err.value)
    with pytest.raises(HelmValuesError):  # an install renders with the same check
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"metrics": {"port": 8081}}, "metrics.port and operator.healthPort are both 8081"),
        ({"networkPolicy": {"enabled": True}}, "set networkPolicy.namespaces"),
        (
            {"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}},
            "serviceMonitor.enabled needs metrics.service.enabled",
        ),
    ],
)
def test_values_the_schema_cannot_judge_fail_the_render_with_a_message(values, says):
    from helm_python import HelmRenderError

    with pytest.raises(HelmRenderError, match=re.escape(says)):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


# --------------------------------------------------------------------------- the operator


def _operator_container(values: dict[str, Any] | None = None) -> dict[str, Any]:
    deployment = one(objects(values), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_is_one_standalone_replica_replaced_by_recreate():
    deployment = one(objects(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == RELEASE
    assert pod["automountServiceAccountToken"] is True


def test_probes_use_kopfs_liveness_endpoint_on_the_health_port():
    container = _operator_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = OperatorSettings()
    assert ports == {"metrics": settings.metrics_port, "health": settings.health_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_default_values_give_the_operators_default_settings():
    """The chart's defaults and settings.py's defaults are one and the same."""
    env = container_env(_operator_container())
    assert OperatorSettings.from_env(env) == OperatorSettings()


def test_every_setting_is_set_from_a_value():
    env = container_env(_operator_container())
    settings_vars = {PREFIX + f.upper() for f in OperatorSettings.__dataclass_fields__}
    assert {k for k in env if k.startswith(PREFIX)} == settings_vars


def test_production_values_reach_the_operator_settings():
    values = production_values()
    settings = OperatorSettings.from_env(container_env(_operator_container(values)))
    assert settings.namespaces == tuple(sorted(values["watchNamespaces"]))
    assert settings.trainer_image == "ghcr.io/dreambooth-operator/trainer:0.1.0"
    assert settings.s3_endpoint == values["storage"]["endpoint"]
    assert settings.credentials_secret == values["storage"]["credentialsSecret"]
    assert settings.output_root == values["storage"]["outputRoot"]
    assert settings.stall_timeout_seconds == values["operator"]["stallTimeoutSeconds"]
    assert settings.termination_grace_seconds == values["trainer"]["terminationGracePeriodSeconds"]
    assert settings.trainer_env == (("NCCL_DEBUG", "WARN"),)


def test_trainer_env_and_extra_resources_reach_the_operator_settings():
    values = {
        "trainer": {
            "env": [{"name": "NCCL_SOCKET_IFNAME", "value": "^lo,docker"}, {"name": "NCCL_DEBUG", "value": "INFO"}],
            "extraResources": {"rdma/rdma_shared_device_a": 1, "nvidia.com/hostdev": "8", "example.com/big": 1000000},
        }
    }
    settings = OperatorSettings.from_env(container_env(_operator_container(values)))
    assert settings.trainer_env == (("NCCL_SOCKET_IFNAME", "^lo,docker"), ("NCCL_DEBUG", "INFO"))
    assert settings.trainer_extra_resources == (
        ("example.com/big", "1000000"),
        ("nvidia.com/hostdev", "8"),
        ("rdma/rdma_shared_device_a", "1"),
    )


#: names the operator's settings refuse and names they accept: the chart's schema must agree,
#: so that a bad value fails `helm install` instead of crash-looping the operator
ENV_NAMES = [
    "HOME",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "JOB_COMPLETION_INDEX",
    "DREAMBOOTH_X",
    "AWS_REGION",
    "PYTHONPATH",
    "RANK",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "TORCHELASTIC_X",
    "TORCH_ELASTIC_X",
    "ACCELERATE_X",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HF_TOKEN",
    "my_password",
    "S3_SECRET",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_DEBUG",
    "NCCL_P2P_DISABLE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "_X",
    "1X",
    "A-B",
]
RESOURCE_NAMES = [
    "rdma/rdma_shared_device_a",
    "nvidia.com/hostdev",
    "example.com/fpga",
    "cpu",
    "memory",
    "nvidia.com/gpu",
    "amd.com/gpu",
    "nvidia.com/mig-3g.20gb",
    "hugepages-2Mi",
    "ephemeral-storage",
    "kubernetes.io/x",
    "node.kubernetes.io/x",
    "rdma",
    "Rdma/x",
]


def _settings_accept(var: str, value: str) -> bool:
    try:
        OperatorSettings.from_env({var: value})
    except ValueError:
        return False
    return True


def _schema_accepts(values: dict[str, Any]) -> bool:
    from helm_python import HelmValuesError

    try:
        chart().validate_schema(values)
    except HelmValuesError:
        return False
    return True


@pytest.mark.parametrize("name", ENV_NAMES)
def test_schema_and_settings_agree_on_trainer_env_names(name):
    import json

    by_settings = _settings_accept(f"{PREFIX}TRAINER_ENV", json.dumps([{"name": name, "value": "1"}]))
    assert _schema_accepts({"trainer": {"env": [{"name": name, "value": "1"}]}}) is by_settings
    assert by_settings is name.startswith(("NCCL_", "TORCH_NCCL_", "OMP_", "HF_HUB_", "_X"))


@pytest.mark.parametrize("name", RESOURCE_NAMES)
def test_schema_and_settings_agree_on_trainer_extra_resources(name):
    import json

    by_settings = _settings_accept(f"{PREFIX}TRAINER_EXTRA_RESOURCES", json.dumps({name: 1}))
    assert _schema_accepts({"trainer": {"extraResources": {name: 1}}}) is by_settings
    assert by_settings is (name in RESOURCE_NAMES[:3])


def test_image_digest_wins_over_the_tag():
    digest = "sha256:" + "ab" * 32
    values = {"image": {"digest": digest}, "trainer": {"image": {"digest": digest, "tag": "x"}}}
    container = _operator_container(values)
    assert container["image"] == f"ghcr.io/dreambooth-operator/operator@{digest}"
    assert container_env(container)["DREAMBOOTH_TRAINER_IMAGE"] == f"ghcr.io/dreambooth-operator/trainer@{digest}"


def test_large_numbers_stay_integers():
    env = container_env(_operator_container({"operator": {"stallTimeoutSeconds": 600_000}}))
    assert OperatorSettings.from_env(env).stall_timeout_seconds == 600_000


def test_extra_env_is_appended():
    env = container_env(
        _operator_container({"operator": {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://p:3128"}]}})
    )
    assert env["HTTPS_PROXY"] == "http://p:3128"


def test_metrics_service_selects_only_the_operator_pod():
    objs = objects()
    service, deployment = one(objs, "Service"), one(objs, "Deployment")
    selector = service["spec"]["selector"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    trainer_labels = naming.labels("toy-cat")
    assert not selector.items() <= trainer_labels.items()


# --------------------------------------------------------------------------- network policy


def test_network_policy_lets_the_operator_reach_the_trainers_metrics_port():
    objs = objects(EVERYTHING)
    policies = of_kind(objs, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    operator_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    trainer_labels = naming.labels("toy-cat")
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= trainer_labels.items()
        metrics_rule, peers_rule = spec["ingress"]
        (operator_peer,) = metrics_rule["from"]
        assert operator_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
        assert operator_peer["podSelector"]["matchLabels"].items() <= operator_labels.items()
        assert metrics_rule["ports"] == [{"port": OperatorSettings().trainer_metrics_port, "protocol": "TCP"}]
        # trainer pods of a job talk to each other on any port (rendezvous, NCCL)
        assert peers_rule == {"from": [{"podSelector": spec["podSelector"]}]}


def test_network_policy_namespaces_and_extra_scrapers():
    values = {
        "networkPolicy": {
            "enabled": True,
            "namespaces": ["ml"],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        }
    }
    (policy,) = of_kind(objects(values), "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "ml"
    assert policy["spec"]["ingress"][0]["from"][1] == {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}


# --------------------------------------------------------------------------- NOTES


def test_notes_tell_the_next_commands():
    notes = render(EVERYTHING)[f"{RELEASE}/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} get pods -l app.kubernetes.io/instance={RELEASE}" in notes
    assert "kubectl -n <namespace> get dbj -w" in notes
    assert "team-a, team-b" in notes
    assert "PodMonitor" in notes and "Grafana dashboard" in notes
    default_notes = render()[f"{RELEASE}/templates/NOTES.txt"]
    assert "every namespace" in default_notes and "crds/" in default_notes


def test_packaged_chart_renders_like_the_folder(tmp_path):
    """`helm package` keeps what the templates read (.Files: crds/, dashboards/)."""
    from helm_python import Chart, package

    archive = package(CHART_DIR, destination=tmp_path)
    assert Path(archive).name == f"{RELEASE}-{chart().version}.tgz"
    with Chart.load(archive) as packaged:
        assert [c["name"] for c in packaged.crds] == [c["name"] for c in chart().crds]
        assert packaged.render(EVERYTHING, name=RELEASE, namespace=NAMESPACE) == render(EVERYTHING)
        names = {f["name"] for f in packaged.files}
    assert {"values-production.yaml", "dashboards/dreambooth.json", "README.md"} <= names
