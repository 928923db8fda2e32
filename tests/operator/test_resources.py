"""The children of a DreamBoothJob: golden YAML for every shipped example, schema-valid for
Kubernetes 1.29-1.33, Pod Security "restricted", no credentials in the open, pvc:// mounts,
the multi-node rendezvous, the podFailurePolicy contract, name lengths, determinism, Kueue.

Regenerate the golden files after an intended change with
``UPDATE_GOLDEN=1 python -m pytest tests/operator/test_resources.py`` and review the diff.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dreambooth.api import manifest, validate_job
from dreambooth.api.config import TrainerConfig
from dreambooth.api.exitcodes import DO_NOT_RETRY
from dreambooth.api.spec import ResourcesSpec
from dreambooth.api.termination import TerminationSummary
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.operator import naming, podtemplate, resources, trainerinputs
from dreambooth.operator.settings import OperatorSettings, SettingsError
from dreambooth.operator.trainerinputs import TrainerInputs
from tests.support.jobs import make_job

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("sweep-"))
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
UID = "3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50"
NAMESPACE = "team-a"
SETTINGS = OperatorSettings(
    trainer_image="ghcr.io/dreambooth-operator/trainer:0.1.0",
    output_root="s3://dreambooth",
    s3_endpoint="minio.minio.svc:9000",
    s3_secure=False,
    credentials_secret="dreambooth-s3",
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ------------------------------------------------------------------------------ builders


def job_doc(path: Path) -> dict[str, Any]:
    (doc,) = [d.data for d in manifest.read(path) if d.kind == "DreamBoothJob"]
    doc["metadata"].update(namespace=NAMESPACE, uid=UID)
    return doc


#: what every job here starts from (tests/support/jobs.py make_job): a uid, as the API
#: server returns the object, and the object preset
CLUSTER_JOB = {"metadata": {"namespace": NAMESPACE, "uid": UID}, "preset": "object"}


def inputs_for(doc: dict[str, Any], settings: OperatorSettings = SETTINGS) -> TrainerInputs:
    return TrainerInputs(validate_job(copy.deepcopy(doc), cluster=True), settings)


def example_inputs() -> list[tuple[str, TrainerInputs]]:
    return [(path.stem, inputs_for(job_doc(path))) for path in EXAMPLES]


def pvc_doc() -> dict[str, Any]:
    return make_job(
        CLUSTER_JOB,
        baseModel={"uri": "pvc://models/sd15", "vae": "pvc://models/vae-ft-mse"},
        instance={"uri": "pvc://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
        prior={"enabled": True, "classPrompt": "a photo of a cat", "uri": "pvc://training-data/cats/"},
        output={"uri": "pvc://results/toy-cat/"},
    )


def long_name_doc() -> dict[str, Any]:
    doc = make_job(CLUSTER_JOB, resources={"nodes": naming.MAX_NODES, "gpusPerNode": 8}, training={"batchSize": 512})
    doc["metadata"]["name"] = "a" * 40 + "-" + "b" * 22  # 63 characters
    return doc


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(job)["containers"]
    return container


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in trainer(job)["env"]}


# ------------------------------------------------------------------------------ golden


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config JSON, the launch script) as readable block literals."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(inputs: TrainerInputs) -> str:
    return yaml.dump_all(resources.children(inputs), Dumper=_Dumper, sort_keys=False, width=100)


@pytest.mark.parametrize("name", [p.stem for p in EXAMPLES])
def test_golden(name: str):
    inputs = dict(example_inputs())[name]
    rendered = render(inputs)
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1 to create it"
    expected = path.read_text()
    if rendered != expected:
        diff = "".join(
            difflib.unified_diff(expected.splitlines(True), rendered.splitlines(True), str(path), "rendered")
        )
        pytest.fail(
            f"rendered children of examples/{name}.yaml differ from {path}.\nIf the "
            "change is intended, regenerate with UPDATE_GOLDEN=1 python -m pytest "
            f"tests/operator/test_resources.py and review the diff.\n{diff[:6000]}"
        )
    # the golden file round-trips to the same objects (block literals lose nothing)
    assert list(yaml.safe_load_all(expected)) == resources.children(inputs)


def test_examples_covered():
    assert {p.stem for p in EXAMPLES} >= {"toy-cat", "multi-gpu", "multi-node", "lora", "face"}
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == {p.stem for p in EXAMPLES}, (
        "stale or missing golden files: run with UPDATE_GOLDEN=1"
    )


# ------------------------------------------------------------------------------ schema


#: what a real GPU cluster adds: NCCL variables and RDMA devices from the operator's
#: settings (the chart's trainer.env / trainer.extraResources) and from the job
CLUSTER_SETTINGS = OperatorSettings(
    s3_endpoint="minio.minio.svc:9000",
    credentials_secret="dreambooth-s3",
    trainer_env=(("NCCL_SOCKET_IFNAME", "eth0"), ("NCCL_DEBUG", "WARN")),
    trainer_extra_resources=(("rdma/rdma_shared_device_a", "1"),),
)


def cluster_extras_doc() -> dict[str, Any]:
    return make_job(
        CLUSTER_JOB,
        resources={
            "nodes": 2,
            "gpusPerNode": 4,
            "memory": "256Gi",
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_IB_HCA", "value": "mlx5"}],
            "extraResources": {"nvidia.com/hostdev": "4", "hugepages-2Mi": "1Gi"},
        },
        training={"batchSize": 8},
    )


def all_cases() -> list[tuple[str, TrainerInputs]]:
    gpu0 = make_job(CLUSTER_JOB, resources={"gpusPerNode": 0})
    digit = make_job(CLUSTER_JOB, resources={"nodes": 2, "gpusPerNode": 1}, training={"batchSize": 4})
    digit["metadata"]["name"] = "2024-cat"
    return example_inputs() + [
        ("pvc", inputs_for(pvc_doc())),
        ("long-name", inputs_for(long_name_doc())),
        ("cpu-only", inputs_for(gpu0)),
        ("no-endpoint-no-secret", inputs_for(make_job(CLUSTER_JOB), OperatorSettings())),
        ("digit-name", inputs_for(digit)),
        ("cluster-extras", inputs_for(cluster_extras_doc(), CLUSTER_SETTINGS)),
    ]


CASES = all_cases()


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_valid_for_kubernetes(case: str, version: str):
    for obj in resources.children(dict(CASES)[case]):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.absolute_path))
            pytest.fail(
                f"{case}: {obj['kind']} invalid for Kubernetes {version} at {path}: {err.message}", pytrace=False
            )


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_names_and_labels_the_api_server_accepts(case: str):
    """What the OpenAPI schema does not say but the API server checks."""
    inputs = dict(CASES)[case]
    cm, svc, job = resources.children(inputs)
    assert DNS_SUBDOMAIN.match(cm["metadata"]["name"]) and len(cm["metadata"]["name"]) <= 253
    assert DNS_1035.match(svc["metadata"]["name"]) and len(svc["metadata"]["name"]) <= 63
    assert DNS_LABEL.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    pod = pod_spec(job)
    labels = [o["metadata"]["labels"] for o in (cm, svc, job)] + [
        job["spec"]["template"]["metadata"]["labels"],
        svc["spec"]["selector"],
    ]
    for value in (v for group in labels for v in group.values()):
        assert len(value) <= 63 and LABEL_VALUE.match(value), value
    for volume in pod["volumes"]:
        assert DNS_LABEL.match(volume["name"]) and len(volume["name"]) <= 63
    assert {m["name"] for m in trainer(job)["volumeMounts"]} == {v["name"] for v in pod["volumes"]}
    for port in trainer(job)["ports"] + svc["spec"]["ports"]:
        assert len(port["name"]) <= 15 and PORT_NAME.match(port["name"])
    container_ports = {p["name"] for p in trainer(job)["ports"]}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in container_ports | {p["containerPort"] for p in trainer(job)["ports"]}
    names = [e["name"] for e in trainer(job)["env"]]
    assert len(names) == len(set(names)), "duplicate env vars"
    codes = job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"]
    assert codes == sorted(set(codes)) and 0 not in codes  # ordered, unique, no 0 with In


# ------------------------------------------------------------------------------ security


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """The Pod Security Standards' "restricted" profile (which includes "baseline") for the
    fields a pod template can set, plus our own rules: read-only root filesystem and no
    service-account token."""
    spec, meta = template["spec"], template.get("metadata", {})
    psc = spec.get("securityContext", {})
    found: list[str] = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(f"{flag} is set")
    for volume in spec.get("volumes", []):
        kind = next(k for k in volume if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: type {kind} is not allowed")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']} is not allowed")
    if psc.get("runAsUser") == 0:
        found.append("pod runAsUser is 0")
    if psc.get("seccompProfile", {}).get("type") == "Unconfined":
        found.append("pod seccomp profile is Unconfined")
    if psc.get("appArmorProfile", {}).get("type") == "Unconfined":
        found.append("pod AppArmor profile is Unconfined")
    if any(
        v == "unconfined"
        for k, v in meta.get("annotations", {}).items()
        if k.startswith("container.apparmor.security.beta.kubernetes.io/")
    ):
        found.append("AppArmor annotation is unconfined")
    if spec.get("automountServiceAccountToken") is not False:
        found.append("automountServiceAccountToken is not false")
    containers = [(k, c) for k in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(k, [])]
    for kind, c in containers:
        where = f"{kind} {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities {caps['add']}")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            found.append(f"{where}: runs as UID 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccomp profile is {seccomp!r}, not RuntimeDefault/Localhost")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount is {sc['procMount']}")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: Windows hostProcess")
        se = {**psc.get("seLinuxOptions", {}), **sc.get("seLinuxOptions", {})}
        if (
            se.get("user")
            or se.get("role")
            or se.get("type", "")
            not in ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
        ):
            found.append(f"{where}: seLinuxOptions {se}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: uses a hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: root filesystem is writable")
    return found


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_pod_security_restricted(case: str):
    job = resources.job(dict(CASES)[case])
    assert restricted_violations(job["spec"]["template"]) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda s: (
                s["securityContext"].pop("runAsNonRoot") and s["containers"][0]["securityContext"].pop("runAsNonRoot")
            ),
            "runAsNonRoot",
        ),
        (
            lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
            "allowPrivilegeEscalation",
        ),
        (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[]), "drop ALL"),
        (
            lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
            "adds capabilities",
        ),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccomp"),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s: s["containers"][0]["ports"][0].update(hostPort=9090), "hostPort"),
        (lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "writable"),
        (lambda s: s.pop("automountServiceAccountToken"), "automountServiceAccountToken"),
        (lambda s: s["securityContext"].update(runAsUser=0), "UID 0"),
    ],
)
def test_restricted_checker_catches(change, expected):
    """The checker is only worth something if it fails on what it should."""
    template = copy.deepcopy(resources.job(dict(CASES)["toy-cat"])["spec"]["template"])
    change(template["spec"])
    assert any(expected in v for v in restricted_violations(template)), expected


CREDENTIAL_NAME = re.compile(r"(?i)(secret|password|token|access_?key|credential)")


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_credentials_only_as_secret_refs(case: str):
    inputs = dict(CASES)[case]
    job, cm = resources.job(inputs), resources.config_map(inputs)
    for var in trainer(job)["env"]:
        if CREDENTIAL_NAME.search(var["name"]):
            assert "value" not in var, f"{var['name']} has a literal value"
            assert set(var["valueFrom"]) == {"secretKeyRef"}, var

    # The config JSON names Secrets at most (the user's reference), never holds key values.
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if path.endswith("credentialsSecret"):
                    assert key in {"name", "accessKeyKey", "secretKeyKey"}, f"{path}.{key}"
                elif CREDENTIAL_NAME.search(key) and key != "credentialsSecret":
                    pytest.fail(f"credential-like field {path}.{key} in the trainer config")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(json.loads(cm["data"]["config.json"]), "")


def test_secret_from_spec_else_settings_else_none():
    with_spec = env_of(resources.job(inputs_for(job_doc(ROOT / "examples/toy-cat.yaml"))))
    assert with_spec["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "minio-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert with_spec["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "minio-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert with_spec["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio.svc:9000"
    from_settings = env_of(resources.job(inputs_for(make_job(CLUSTER_JOB))))
    assert from_settings["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "dreambooth-s3"
    custom_keys = make_job(
        CLUSTER_JOB,
        storage={
            "credentialsSecret": {"name": "s3", "accessKeyKey": "user", "secretKeyKey": "password"},
            "secure": True,
        },
    )
    env = env_of(resources.job(inputs_for(custom_keys)))
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "password"}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://minio.minio.svc:9000"
    bare = env_of(resources.job(inputs_for(make_job(CLUSTER_JOB), OperatorSettings())))
    assert "AWS_ACCESS_KEY_ID" not in bare and "AWS_ENDPOINT_URL_S3" not in bare
    assert bare["AWS_REGION"]["value"] == "us-east-1"


# ------------------------------------------------------------------------------ pvc://


def test_pvc_uris_are_mounted_and_rewritten():
    inputs = inputs_for(pvc_doc())
    config = trainerinputs.trainer_config(inputs)
    assert config.spec.base_model.uri == "file:///mnt/pvc/models/sd15"
    assert config.spec.base_model.vae == "file:///mnt/pvc/models/vae-ft-mse"
    assert config.spec.instance.uri == "file:///mnt/pvc/training-data/toy-cat/"
    assert config.spec.prior.uri == "file:///mnt/pvc/training-data/cats/"
    assert config.output_uri == "file:///mnt/pvc/results/toy-cat/"
    assert config.spec.output.uri == config.output_uri
    assert config.class_cache_uri == "file:///mnt/pvc/results/.cache/class-images/"
    assert "pvc://" not in json.dumps(config.wire())

    job = resources.job(inputs)
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v
    }
    assert {c: v["persistentVolumeClaim"]["readOnly"] for c, v in claims.items()} == {
        "models": True,
        "training-data": True,
        "results": False,
    }
    mounts = {m["name"]: m for m in trainer(job)["volumeMounts"]}
    for claim, volume in claims.items():
        mount = mounts[volume["name"]]
        assert mount["mountPath"] == f"/mnt/pvc/{claim}"
        assert mount["readOnly"] is volume["persistentVolumeClaim"]["readOnly"]
    # every local path the trainer gets lies on a mount, written ones on a writable one
    for uri, written in [
        (config.spec.base_model.uri, False),
        (config.spec.base_model.vae, False),
        (config.spec.instance.uri, False),
        (config.spec.prior.uri, False),
        (config.output_uri, True),
        (config.class_cache_uri, True),
    ]:
        path = uri.removeprefix("file://")
        (mount,) = [m for m in mounts.values() if path.startswith(m["mountPath"] + "/")]
        assert not (written and mount.get("readOnly")), uri


def test_pvc_claim_read_and_written_is_writable_and_settings_root_may_be_a_pvc():
    doc = make_job(CLUSTER_JOB, instance={"uri": "pvc://shared/photos/", "prompt": "a photo of zwx cat"})
    inputs = inputs_for(doc, OperatorSettings(output_root="pvc://shared/runs"))
    assert trainerinputs.trainer_config(inputs).output_uri == "file:///mnt/pvc/shared/runs/team-a/toy-cat/"
    assert trainerinputs.claim_mounts(inputs) == [trainerinputs.ClaimMount("shared", read_only=False, volume="pvc-0")]


def test_config_map_is_what_the_trainer_parses():
    for _, inputs in CASES:
        text = resources.config_map(inputs)["data"]["config.json"]
        parsed = TrainerConfig.model_validate(json.loads(text))  # as dreambooth.trainer does
        assert parsed == trainerinputs.trainer_config(inputs)
        assert parsed.job.uid == UID and parsed.job.namespace == NAMESPACE


def test_pvc_paths_stay_on_their_claim():
    assert trainerinputs.local_uri("pvc://data/a/b/") == "file:///mnt/pvc/data/a/b/"
    assert trainerinputs.local_uri("s3://bucket/x/") == "s3://bucket/x/"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        trainerinputs.local_uri("pvc://data/../etc/")


def test_a_pvc_path_is_literal_in_the_file_uri_the_pods_read():
    """pvc:// paths are literal, file:// paths percent-decoded: a '%' stays a '%'."""
    uri = trainerinputs.local_uri("pvc://data/100%25/a%2e%2e/")
    assert uri == "file:///mnt/pvc/data/100%2525/a%252e%252e/"
    assert parse_uri(uri, allowed={Scheme.FILE}).path == "/mnt/pvc/data/100%25/a%2e%2e/"


def test_no_pvc_no_claims():
    job = resources.job(dict(CASES)["toy-cat"])
    assert not any("persistentVolumeClaim" in v for v in pod_spec(job)["volumes"])


# ------------------------------------------------------------------------------ the command


def test_single_process_runs_the_trainer_directly():
    for case in ("toy-cat", "face", "lora", "cpu-only"):
        job = resources.job(dict(CASES)[case])
        assert trainer(job)["command"] == ["python", "-m", "dreambooth.trainer"], case
        assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env_of(job)


def test_multi_node_rendezvous():
    inputs = dict(CASES)["multi-node"]
    job, svc = resources.job(inputs), resources.service(inputs)
    script = trainer(job)["command"][2]
    assert trainer(job)["command"][:2] == ["/bin/sh", "-c"]
    flags = " ".join(script.replace("\\\n", " ").split())
    assert "accelerate launch --multi_gpu --num_processes 16 --num_machines 2" in flags
    assert '--machine_rank "${JOB_COMPLETION_INDEX:?}"' in flags
    host = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert f"--main_process_ip {host} --main_process_port 29500" in flags
    assert "--mixed_precision bf16 --dynamo_backend no -m dreambooth.trainer &" in flags
    assert pod_spec(job)["subdomain"] == svc["metadata"]["name"] == job["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert env_of(job)["JOB_COMPLETION_INDEX"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env_of(job)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == str(podtemplate.SHUTDOWN_TIMEOUT_SECONDS)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    ports = {p["name"]: p["containerPort"] for p in trainer(job)["ports"]}
    assert ports == {"metrics": 9090, "rendezvous": 29500}
    assert {p["name"] for p in svc["spec"]["ports"]} == {"metrics", "rendezvous"}
    assert trainer(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_single_node_multi_gpu_needs_no_dns():
    script = trainer(resources.job(dict(CASES)["multi-gpu"]))["command"][2]
    assert "--num_processes 2 --num_machines 1" in script
    assert "--main_process_ip" not in script and "JOB_COMPLETION_INDEX" not in script


def test_launch_script_has_no_kubernetes_variable_references():
    """Kubernetes rewrites ``$(NAME)`` and ``$$`` in commands; the script relies on neither."""
    script = trainer(resources.job(dict(CASES)["multi-node"]))["command"][2]
    assert "$(" not in script and "$$" not in script


#: a stand-in for the trainer that keeps its contract with the launch script (the real
#: StopRequest, write_verdict and write_summary of dreambooth.trainer.__main__): STUB_MODES
#: says, per local rank, what each process does
STUB = """\
import os, pathlib, signal, sys, time
from dreambooth.api.termination import STOP_FILE, TerminationSummary
from dreambooth.trainer.__main__ import StopRequest, write_summary, write_verdict
rank, work = int(os.environ["RANK"]), pathlib.Path(os.environ["DREAMBOOTH_WORKDIR"])
mode = os.environ["STUB_MODES"].split(",")[int(os.environ["LOCAL_RANK"])]
def finish(code, reason):
    summary = TerminationSummary(exit_code=code, reason=reason, rank=rank, finished_at=time.time())
    write_verdict(work, summary)
    write_summary(pathlib.Path(os.environ["DREAMBOOTH_TERMINATION_LOG"]), summary)
    sys.exit(code)
signal.signal(signal.SIGTERM, lambda *_: (work / f"sigterm-{rank}").write_text(""))
(work / f"ready-{rank}").write_text("")
if mode == "bad-data":
    finish(11, "BadData")
if mode == "ok":
    finish(0, "Succeeded")
if mode == "blocked":  # as in a collective whose peer is gone: deaf to SIGTERM
    while True:
        time.sleep(1)
stop = StopRequest(work / STOP_FILE)
while not stop.is_set():
    time.sleep(0.05)
time.sleep(1)  # 'checkpointing'
finish(21, "Preempted")
"""


def _run_launch(tmp_path: Path, modes: str, *, term_after_ready: bool = False):
    """Run the multi-GPU pod's script with 2 CPU processes (gloo) of a stub trainer, with
    the pod's environment; returns (exit code, termination message, seconds taken)."""
    (tmp_path / "stub_trainer.py").write_text(STUB)
    log, work = tmp_path / "termination-log", tmp_path / "work"
    job = resources.job(dict(CASES)["multi-gpu"])
    script = trainer(job)["command"][2]
    script = script.replace("--mixed_precision bf16", "--mixed_precision no")
    script = script.replace("-m dreambooth.trainer &", "-m stub_trainer &")
    pod_env = {e["name"]: e["value"] for e in trainer(job)["env"] if "value" in e}
    env = {
        **os.environ,
        "STUB_MODES": modes,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": pod_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"],
        "DREAMBOOTH_WORKDIR": str(work),
        "DREAMBOOTH_TERMINATION_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if term_after_ready:
        deadline = time.monotonic() + 90
        while len(list(work.glob("ready-*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # what the kubelet does to the pod's PID 1
    out, _ = proc.communicate(timeout=120)
    message = TerminationSummary.loads(log.read_text()) if log.exists() else None
    return proc.returncode, message, time.monotonic() - started, out.decode()


accelerate_missing = pytest.mark.skipif(
    not (Path(sys.executable).parent / "accelerate").exists(), reason="accelerate not installed"
)


@accelerate_missing
def test_launch_passes_on_the_trainers_exit_code(tmp_path: Path):
    """``accelerate launch`` itself exits 1; the pod must exit 11 for the podFailurePolicy."""
    code, message, _, out = _run_launch(tmp_path, "bad-data,ok")
    assert code == 11 and message.reason == "BadData" and message.rank == 0, out[-3000:]


@accelerate_missing
def test_a_do_not_retry_failure_of_local_rank_1_is_the_pods_verdict(tmp_path: Path):
    """Defect: only local rank 0 wrote the termination message, so a do-not-retry code of
    another process became exit 1 and was retried; and torchrun waited a whole grace period
    for the processes blocked in a collective. Now any process's verdict counts and the
    blocked ones are stopped within the short shutdown timeout."""
    code, message, seconds, out = _run_launch(tmp_path, "blocked,bad-data")
    assert code == 11, out[-3000:]
    assert (message.exit_code, message.reason, message.rank) == (11, "BadData", 1)
    assert seconds < podtemplate.SHUTDOWN_TIMEOUT_SECONDS + 30, f"took {seconds:.0f} s"


@accelerate_missing
def test_launch_takes_the_pods_sigterm_and_waits_for_the_checkpoint(tmp_path: Path):
    code, message, _, out = _run_launch(tmp_path, "stop,stop", term_after_ready=True)
    assert code == 21 and message.reason == "Preempted", out[-3000:]
    work = tmp_path / "work"
    assert not list(work.glob("sigterm-*")), "torchrun must not pass the pod's SIGTERM on"


# ------------------------------------------------------------------------------ the Job


def test_pod_failure_policy_lists_exactly_the_do_not_retry_codes():
    for case, inputs in CASES:
        job = resources.job(inputs)
        rules = job["spec"]["podFailurePolicy"]["rules"]
        codes = [r["onExitCodes"] for r in rules if "onExitCodes" in r]
        assert len(codes) == 1 and [r["action"] for r in rules if "onExitCodes" in r] == ["FailJob"], case
        assert codes[0]["operator"] == "In" and codes[0]["containerName"] == trainer(job)["name"]
        assert codes[0]["values"] == sorted(int(c) for c in DO_NOT_RETRY)
        disruption = [r for r in rules if "onPodConditions" in r]
        assert [r["onPodConditions"] for r in disruption] == [[{"type": "DisruptionTarget", "status": "True"}]]
        assert pod_spec(job)["restartPolicy"] == "Never"


def test_multi_node_job_fails_on_the_first_lost_pod_so_that_all_pods_restart_together():
    """Defect 3: an Indexed Job replaces only the failed index, the other ranks wait in a
    collective and the new pod meets a stale rendezvous. A multi-node Job ends at the first
    lost pod (the Job controller stops the others); the operator starts all pods again."""
    multi = resources.job(dict(CASES)["multi-node"])
    assert multi["spec"]["backoffLimit"] == 0  # runPolicy.backoffLimit (6) is the operator's
    rules = multi["spec"]["podFailurePolicy"]["rules"]
    assert "Ignore" not in [r["action"] for r in rules]
    # a disruption fails it too, first, so that the Job's failure says it was one
    assert rules[0] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    single = resources.job(dict(CASES)["toy-cat"])  # unchanged: the Job retries its one pod
    assert single["spec"]["backoffLimit"] == 3
    assert single["spec"]["podFailurePolicy"]["rules"][0]["action"] == "Ignore"
    for job in (multi, single):
        assert job["metadata"]["annotations"]["dreambooth.io/restarts"] == "0"
    again = resources.job(TrainerInputs(dict(CASES)["multi-node"].job, SETTINGS, restarts=2))
    assert again["metadata"]["annotations"]["dreambooth.io/restarts"] == "2"


def test_a_recreated_jobs_deadline_counts_from_the_jobs_first_start():
    inputs = dict(CASES)["multi-node"]  # activeDeadlineSeconds 86400
    later = TrainerInputs(inputs.job, SETTINGS, restarts=1, elapsed_seconds=3600)
    assert resources.job(later)["spec"]["activeDeadlineSeconds"] == 86400 - 3600
    past = TrainerInputs(inputs.job, SETTINGS, elapsed_seconds=90000)
    assert resources.job(past)["spec"]["activeDeadlineSeconds"] == 1  # fails at once: DeadlineExceeded


def _launch_argv(job: dict[str, Any], index: int) -> list[str]:
    """The ``accelerate launch`` arguments of pod ``index``, as its shell would pass them."""
    launch = trainer(job)["command"][2].split("accelerate launch", 1)[1].split(" &", 1)[0]
    launch = launch.replace("\\\n", " ")  # the shell drops backslash-newlines
    return shlex.split(launch.replace('"${JOB_COMPLETION_INDEX:?}"', str(index)))


@accelerate_missing
def test_multi_node_rendezvous_timeout_reaches_torchs_static_rendezvous():
    """runPolicy.rendezvousTimeoutSeconds -> ``--rdzv_conf timeout=<s>`` -> torchrun's static
    rendezvous: pod 0's TCPStore waits that long for the other pods, and they for it (without
    the flag: 900 s, torchrun's LaunchConfig default; the static handler's own is 600 s)."""
    from accelerate.commands.launch import (
        _filter_args,
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import create_rdzv_handler

    doc = job_doc(ROOT / "examples" / "multi-node.yaml")
    assert "--rdzv_conf timeout=1800" in trainer(resources.job(inputs_for(doc)))["command"][2]  # the default
    doc["spec"]["runPolicy"]["rendezvousTimeoutSeconds"] = 3600
    job = resources.job(inputs_for(doc))
    # what `accelerate launch` does with pod 1's arguments before handing over to torchrun
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(_launch_argv(job, index=1)))
    prepare_multi_gpu_env(args)
    config, _, _ = torchrun.config_from_args(
        _filter_args(
            args,
            torchrun.get_args_parser(),
            ["--training_script", args.training_script, "--training_script_args", args.training_script_args],
        )
    )
    assert config.rdzv_backend == "static" and config.rdzv_configs["timeout"] == "3600"
    handler = create_rdzv_handler(
        RendezvousParameters(
            backend=config.rdzv_backend,
            endpoint=config.rdzv_endpoint,
            run_id=config.run_id,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            **config.rdzv_configs,
        )
    )
    assert handler.timeout.total_seconds() == 3600 and handler.world_size == 2
    single = trainer(resources.job(dict(CASES)["multi-gpu"]))["command"][2]
    assert "--rdzv_conf" not in single  # one node: no rendezvous across pods


def test_run_policy_and_scheduling():
    job = resources.job(dict(CASES)["multi-node"])
    spec, pod = job["spec"], pod_spec(job)
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 86400
    assert "ttlSecondsAfterFinished" not in spec
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"
    assert pod["terminationGracePeriodSeconds"] == SETTINGS.termination_grace_seconds
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert trainer(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    ttl = resources.job(inputs_for(make_job(CLUSTER_JOB, runPolicy={"ttlSecondsAfterFinished": 60, "suspend": True})))
    assert ttl["spec"]["suspend"] is True
    # the job's ttl deletes the DreamBoothJob (the Job follows); a Job deleted on its own
    # before the operator saw it finish would look like one to re-create
    assert "ttlSecondsAfterFinished" not in ttl["spec"]


def test_gpus_and_image():
    cpu = resources.job(dict(CASES)["cpu-only"])
    assert "resources" not in trainer(cpu)
    custom = make_job(
        CLUSTER_JOB,
        resources={
            "gpusPerNode": 1,
            "gpu": {"resourceName": "amd.com/gpu"},
            "image": "registry.local/trainer:dev",
            "memory": "32Gi",
        },
    )
    c = trainer(resources.job(inputs_for(custom)))
    assert c["image"] == "registry.local/trainer:dev"
    assert c["resources"] == {
        "limits": {"amd.com/gpu": "1", "memory": "32Gi"},
        "requests": {"amd.com/gpu": "1", "memory": "32Gi"},
    }
    assert trainer(resources.job(dict(CASES)["toy-cat"]))["image"] == SETTINGS.trainer_image


def test_every_child_is_owned_and_labelled():
    for case, inputs in CASES:
        for obj in resources.children(inputs):
            assert obj["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": "dreambooth.io/v1alpha1",
                    "kind": "DreamBoothJob",
                    "name": inputs.name,
                    "uid": UID,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ], case
            assert obj["metadata"]["namespace"] == NAMESPACE
            assert naming.labels(inputs.name).items() <= obj["metadata"]["labels"].items()
        pod_labels = resources.job(inputs)["spec"]["template"]["metadata"]["labels"]
        assert pod_labels == naming.labels(inputs.name)  # what a PodMonitor selects on


def test_kueue_labels_copied_and_job_created_suspended():
    job = resources.job(dict(CASES)["multi-node"])
    assert job["metadata"]["labels"][naming.QUEUE_LABEL] == "a100-queue"
    assert job["spec"]["suspend"] is True  # Kueue unsuspends it on admission
    assert naming.QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    plain = resources.job(dict(CASES)["toy-cat"])
    assert naming.QUEUE_LABEL not in plain["metadata"]["labels"]
    assert plain["spec"]["suspend"] is False


# ------------------------------------------------------------------------------ names


def test_names_fit_for_a_63_character_job_name():
    inputs = dict(CASES)["long-name"]
    assert len(inputs.name) == 63
    job, svc, cm = resources.job(inputs), resources.service(inputs), resources.config_map(inputs)
    assert DNS_1035.match(svc["metadata"]["name"]) and len(svc["metadata"]["name"]) <= 63
    assert job["spec"]["completions"] == naming.MAX_NODES
    hostname = naming.pod_hostname(inputs.name, job["spec"]["completions"] - 1)
    assert hostname == f"{job['metadata']['name']}-63"
    assert len(hostname) <= 63 and DNS_LABEL.match(hostname)
    assert len(cm["metadata"]["name"]) <= 253
    for value in job["metadata"]["labels"].values():
        assert len(value) <= 63


def test_names_are_stable_distinct_and_valid():
    assert naming.trainer_name("toy-cat") == "toy-cat-trainer"
    assert naming.config_map_name("toy-cat") == "toy-cat-trainer-config"
    long_a, long_b = "x" * 60 + "-aa", "x" * 60 + "-bb"
    assert naming.trainer_name(long_a) != naming.trainer_name(long_b)
    assert naming.trainer_name(long_a) == naming.trainer_name(long_a)
    for name in [long_a, long_b, "7-cats", "1", "a", "a" * 52, "a" * 53, "a-" * 31 + "a"]:
        trainer_name = naming.trainer_name(name)
        assert DNS_1035.match(trainer_name), trainer_name
        assert len(naming.pod_hostname(name, naming.MAX_NODES - 1)) <= 63, name


def test_max_nodes_matches_the_api_bound():
    bound = next(m.le for m in ResourcesSpec.model_fields["nodes"].metadata if hasattr(m, "le"))
    assert bound == naming.MAX_NODES


# ------------------------------------------------------------------------------ purity


def test_same_input_same_output():
    for path in EXAMPLES:
        first = resources.children(inputs_for(job_doc(path)))
        again = resources.children(inputs_for(job_doc(path)))
        assert first == again
        assert render(inputs_for(job_doc(path))) == render(inputs_for(job_doc(path)))


def test_inputs_need_the_api_servers_metadata():
    doc = make_job(CLUSTER_JOB)
    del doc["metadata"]["uid"]
    with pytest.raises(ValueError, match="uid"):
        inputs_for(doc)


def test_file_uris_are_refused():
    doc = make_job(CLUSTER_JOB, output={"uri": "file:///tmp/out"})
    inputs = TrainerInputs(validate_job(doc), SETTINGS)  # validated without cluster=True
    with pytest.raises(ValueError, match="file://"):
        trainerinputs.trainer_config(inputs)


def test_operator_modules_do_not_import_torch():
    code = (
        "import sys, dreambooth.operator.resources, dreambooth.operator.settings\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', "
        "'accelerate', 'transformers') or m.startswith('dreambooth.trainer')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------ settings


def test_settings_defaults():
    s = OperatorSettings.from_env({})
    assert s == OperatorSettings()
    assert (s.trainer_image, s.output_root, s.s3_secure) == (
        "ghcr.io/dreambooth-operator/trainer:0.1.0",
        "s3://dreambooth",
        True,
    )
    assert (
        s.poll_interval_seconds,
        s.stall_timeout_seconds,
        s.trainer_metrics_port,
        s.metrics_port,
        s.health_port,
        s.termination_grace_seconds,
    ) == (10, 900, 9090, 8080, 8081, 300)
    assert s.namespaces == () and s.credentials_secret is None and s.s3_endpoint is None


def test_settings_from_env():
    s = OperatorSettings.from_env(
        {
            "DREAMBOOTH_TRAINER_IMAGE": "registry.local/trainer:1",
            "DREAMBOOTH_OUTPUT_ROOT": "s3://outputs/",
            "DREAMBOOTH_S3_ENDPOINT": "minio.minio.svc:9000",
            "DREAMBOOTH_S3_SECURE": "false",
            "DREAMBOOTH_CREDENTIALS_SECRET": "minio-credentials",
            "DREAMBOOTH_NAMESPACES": " team-b, team-a ,,",
            "DREAMBOOTH_POLL_INTERVAL_SECONDS": "5",
            "DREAMBOOTH_TERMINATION_GRACE_SECONDS": "600",
        }
    )
    assert s.namespaces == ("team-a", "team-b") and s.s3_secure is False
    assert s.output_root == "s3://outputs" and s.poll_interval_seconds == 5
    d = s.defaults()
    assert (d.output_root, d.s3_endpoint, d.s3_secure, d.metrics_port) == (
        "s3://outputs",
        "minio.minio.svc:9000",
        False,
        9090,
    )


def test_settings_errors_name_every_bad_variable():
    with pytest.raises(SettingsError) as err:
        OperatorSettings.from_env(
            {
                "DREAMBOOTH_OUTPUT_ROOT": "gs://bucket",
                "DREAMBOOTH_S3_ENDPOINT": "http://minio:9000",
                "DREAMBOOTH_S3_SECURE": "maybe",
                "DREAMBOOTH_CREDENTIALS_SECRET": "Bad_Name",
                "DREAMBOOTH_NAMESPACES": "ok,NOT OK",
                "DREAMBOOTH_POLL_INTERVAL_SECONDS": "0",
                "DREAMBOOTH_TRAINER_METRICS_PORT": "nine",
            }
        )
    message = str(err.value)
    for var in (
        "OUTPUT_ROOT",
        "S3_ENDPOINT",
        "S3_SECURE",
        "CREDENTIALS_SECRET",
        "NAMESPACES",
        "POLL_INTERVAL_SECONDS",
        "TRAINER_METRICS_PORT",
    ):
        assert f"DREAMBOOTH_{var}=" in message, var
    assert len(err.value.problems) == 7
    with pytest.raises(SettingsError, match="rendezvous"):
        OperatorSettings.from_env({"DREAMBOOTH_TRAINER_METRICS_PORT": "29500"})
    with pytest.raises(SettingsError, match="DREAMBOOTH_HEALTH_PORT are both 8080"):
        OperatorSettings.from_env({"DREAMBOOTH_HEALTH_PORT": "8080"})
