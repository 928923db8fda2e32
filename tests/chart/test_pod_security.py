"""Rendered pod specs meet the Pod Security Standard "restricted" (every control of the
baseline and restricted profiles, as pod-security-admission checks them), so the chart
installs into a namespace labelled pod-security.kubernetes.io/enforce: restricted. The
trainer pods the operator creates are held to the same checker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dreambooth.api import manifest, validate_job
from dreambooth.operator import resources, trainerinputs
from dreambooth.operator.settings import OperatorSettings
from tests.chart.support import EVERYTHING, ROOT, container_env, objects, one, production_values

_ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
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
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What keeps ``pod`` (a PodSpec) from the "restricted" profile; empty: it meets it."""
    bad: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [
        (kind, c) for kind in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(kind) or []
    ]
    # --- baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field}: true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("pod hostProcess")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUMES:
            bad.append(f"volume {volume['name']}: {sorted(kinds - _ALLOWED_VOLUMES)} not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in _SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    if (psc.get("seLinuxOptions") or {}).get("type") not in _SELINUX_TYPES:
        bad.append("pod seLinuxOptions.type")
    if {"user", "role"} & set(psc.get("seLinuxOptions") or {}):
        bad.append("pod seLinuxOptions user/role")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser: 0")
    if (psc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        bad.append("pod appArmorProfile")
    for kind, c in containers:
        name = f"{kind}[{c['name']}]"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{name} privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{name} hostProcess")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name} hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name} procMount")
        if (sc.get("seLinuxOptions") or {}).get("type") not in _SELINUX_TYPES:
            bad.append(f"{name} seLinuxOptions.type")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{name} appArmorProfile")
        # --- restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name} allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name} must drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name} adds capabilities {caps['add']}")
        if not (
            sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)
        ):
            bad.append(f"{name} runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name} runAsUser: 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name} seccompProfile must be RuntimeDefault or Localhost")
    return bad


def _pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in objs:
        spec = obj.get("spec") or {}
        if obj["kind"] == "Pod":
            out.append((obj["metadata"]["name"], spec))
        elif "template" in spec and "spec" in spec["template"]:
            out.append((f"{obj['kind']} {obj['metadata']['name']}", spec["template"]["spec"]))
    return out


@pytest.mark.parametrize("values", [{}, production_values(), EVERYTHING], ids=["defaults", "production", "everything"])
def test_chart_pods_meet_pod_security_restricted(values):
    pods = _pod_specs(objects(values))
    assert pods, "no pod template rendered"
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


def test_operator_container_is_hardened_beyond_restricted():
    ((_, pod),) = _pod_specs(objects())
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsGroup"] == 1000
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the only writable path


@pytest.mark.parametrize(
    "example",
    sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("sweep-")),
    ids=lambda p: p.stem,
)
def test_trainer_pods_the_operator_creates_meet_it_too(example: Path):
    (doc,) = [d.data for d in manifest.read(example) if d.kind == "DreamBoothJob"]
    doc["metadata"].update(namespace="team-a", uid="3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50")
    inputs = trainerinputs.TrainerInputs(validate_job(doc, cluster=True), OperatorSettings())
    assert restricted_violations(resources.job(inputs)["spec"]["template"]["spec"]) == []


def test_trainer_pods_stay_restricted_with_nccl_variables_and_rdma_devices():
    """Env vars and device-plugin resources need no privilege: the chart's trainer defaults
    (through the operator's settings) and a job's own keep the pods "restricted". RDMA
    memory pinning (IPC_LOCK) or hostNetwork would not, and the operator adds neither."""
    values = {
        "trainer": {
            "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
            "extraResources": {"rdma/rdma_shared_device_a": 1},
        }
    }
    deployment = one(objects(values), "Deployment")
    settings = OperatorSettings.from_env(container_env(deployment["spec"]["template"]["spec"]["containers"][0]))
    (doc,) = [d.data for d in manifest.read(ROOT / "examples" / "multi-node.yaml") if d.kind == "DreamBoothJob"]
    doc["metadata"].update(namespace="team-a", uid="3f0e5a8c-7d1b-4c2e-9a6f-0b1c2d3e4f50")
    doc["spec"]["resources"]["env"] = [{"name": "NCCL_DEBUG", "value": "INFO"}]
    doc["spec"]["resources"]["extraResources"] = {"nvidia.com/hostdev": "8", "hugepages-2Mi": "2Gi"}
    pod = resources.job(trainerinputs.TrainerInputs(validate_job(doc, cluster=True), settings))["spec"]["template"][
        "spec"
    ]
    (container,) = pod["containers"]
    assert {"NCCL_IB_HCA", "NCCL_DEBUG"} <= {e["name"] for e in container["env"]}
    assert {"rdma/rdma_shared_device_a", "nvidia.com/hostdev", "hugepages-2Mi"} <= set(container["resources"]["limits"])
    assert restricted_violations(pod) == []
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]} and not pod.get("hostNetwork")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda p: p.update(hostNetwork=True), "hostNetwork"),
        (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
            "adds capabilities",
        ),
        (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (
            lambda p: (
                p["securityContext"].pop("runAsNonRoot") and p["containers"][0]["securityContext"].pop("runAsNonRoot")
            ),
            "runAsNonRoot",
        ),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        # what RDMA setups often ask for, and why the operator does not add it
        (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["IPC_LOCK"]), "adds capabilities"),
        (lambda p: p.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"), "hostNetwork"),
    ],
)
def test_the_checker_catches_each_violation(change, says):
    ((_, pod),) = _pod_specs(objects())
    change(pod)
    assert any(says in v for v in restricted_violations(pod)), restricted_violations(pod)
