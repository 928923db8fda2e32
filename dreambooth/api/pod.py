"""What a job (``spec.resources.env``, ``spec.resources.extraResources``) or the operator's
settings (the chart's ``trainer.env``, ``trainer.extraResources``) may add to trainer pods,
and what they may not.

One definition for the typed rules (:mod:`dreambooth.api.rules`), the CRD's CEL rules
(:mod:`dreambooth.api.crd`) and the operator's settings: environment variables with literal
values for things such as NCCL (``NCCL_SOCKET_IFNAME``, ``NCCL_IB_HCA``, ``NCCL_DEBUG``), and
extended resources from device plugins (RDMA devices, ``nvidia.com/hostdev``, hugepages).
Names the operator, the launcher or the device plugin set are refused, and so are names
that look like credentials: those reach pods only from Secrets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: a name a shell and every launcher can pass on (POSIX: letters, digits, underscore)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_MAX = 128
ENV_VALUE_MAX = 4096
#: what reads like a secret; literal values are visible to anyone who can read the job
CREDENTIAL_PATTERN = r"(?i)(secret|password|passwd|token|access_?key|credential|api_?key)"


@dataclass(frozen=True)
class Reserved:
    """Names (exact) and prefixes that only one party sets, why, and what to do instead."""

    names: tuple[str, ...]
    prefixes: tuple[str, ...]
    why: str
    action: str = "remove it"


#: Checked in this order; the first match explains the refusal. The operator's own
#: variables (dreambooth/operator/podtemplate.py ``_env``) must all be covered: a test checks.
RESERVED_ENV: tuple[Reserved, ...] = (
    Reserved(
        ("HOME", "XDG_CACHE_HOME", "HF_HOME", "JOB_COMPLETION_INDEX"),
        ("DREAMBOOTH_",),
        "set by the operator in every trainer pod (config, caches, rank)",
    ),
    Reserved(
        (),
        ("AWS_",),
        "S3 settings and credentials, which come from spec.storage (endpoint, region, credentialsSecret)",
        "set them there",
    ),
    Reserved((), ("PYTHON",), "set by the image and the operator (PYTHONUNBUFFERED, PYTHONDONTWRITEBYTECODE)"),
    Reserved(
        (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "GROUP_WORLD_SIZE",
            "ROLE_RANK",
            "ROLE_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ),
        ("TORCH_ELASTIC_", "TORCHELASTIC_", "ACCELERATE_"),
        "set by accelerate/torchrun for each training process from resources.nodes and resources.gpusPerNode",
    ),
    Reserved(
        ("CUDA_VISIBLE_DEVICES",),
        ("NVIDIA_",),
        "the GPUs a container sees, set by the device plugin from resources.gpusPerNode "
        "(another value could expose GPUs the pod was not given)",
    ),
)

_CREDENTIAL_RE = re.compile(CREDENTIAL_PATTERN)
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
CREDENTIAL_WHY = (
    "looks like a credential: env values are literal and readable by anyone who "
    "can read the job, so credentials reach pods only from Secrets "
    "(spec.storage.credentialsSecret): remove it"
)


def reserved_label(reserved: Reserved) -> str:
    """``HOME, ..., DREAMBOOTH_*``: what a Reserved entry covers, for messages."""
    return ", ".join([*reserved.names, *(p + "*" for p in reserved.prefixes)])


def env_name_problem(name: str) -> str | None:
    """Why ``name`` may not be set through spec.resources.env or trainer.env; None: it may."""
    if len(name) > ENV_NAME_MAX or not _ENV_NAME_RE.match(name):
        return (
            f"{name!r} is not an environment variable name: letters, digits and '_', "
            f"not starting with a digit, at most {ENV_NAME_MAX} characters"
        )
    for reserved in RESERVED_ENV:
        if name in reserved.names:
            return f"{name} is reserved, {reserved.why}: {reserved.action}"
        prefix = next((p for p in reserved.prefixes if name.startswith(p)), None)
        if prefix:
            return f"{name}: {prefix}* variables are reserved, {reserved.why}: {reserved.action}"
    if _CREDENTIAL_RE.search(name):
        return f"{name} {CREDENTIAL_WHY}"
    return None


# --------------------------------------------------------------------------- resources

#: ``<DNS subdomain>/<name>`` as device plugins advertise them (e.g. rdma/rdma_shared_device_a,
#: nvidia.com/hostdev); hugepages have names of their own (hugepages-2Mi, hugepages-1Gi)
EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
    r"/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
HUGEPAGES_PATTERN = r"^hugepages-[0-9]+(Ki|Mi|Gi)$"
HUGEPAGES_PREFIX = "hugepages-"
#: a MIG slice's resource name: one CUDA device per process
MIG_PREFIX = "nvidia.com/mig-"
#: resources with a field of their own in spec.resources
OWN_FIELDS = {"cpu": "resources.cpu", "memory": "resources.memory"}

_EXTENDED_RE = re.compile(EXTENDED_RESOURCE_PATTERN)
_HUGEPAGES_RE = re.compile(HUGEPAGES_PATTERN)
_WHOLE_RE = re.compile(r"^[0-9]+$")
_ZERO_RE = re.compile(r"^0+(\.0+)?[A-Za-z]*$")


def is_mig(resource_name: str) -> bool:
    """A MIG slice (nvidia.com/mig-<profile>, e.g. nvidia.com/mig-3g.20gb): one device."""
    return resource_name.startswith(MIG_PREFIX)


def is_hugepages(name: str) -> bool:
    return name.startswith(HUGEPAGES_PREFIX)


def is_zero(quantity: str) -> bool:
    """``"0"`` (or ``"0Mi"``): no request at all; a job drops an operator default this way."""
    return bool(_ZERO_RE.match(quantity))


def resource_name_problem(name: str, gpu_resource: str | None) -> str | None:
    """Why ``name`` may not be an extra resource; ``gpu_resource``: the job's GPU (None: the
    operator's defaults, which serve jobs with any GPU)."""
    if name in OWN_FIELDS:
        return f"{name} has its own field: use {OWN_FIELDS[name]}"
    if name == gpu_resource or (gpu_resource is None and (name.endswith("/gpu") or is_mig(name))):
        return f"{name} is the job's GPU: request it with resources.gpusPerNode (and resources.gpu.resourceName)"
    if len(name) > 253 or not (_EXTENDED_RE.match(name) or _HUGEPAGES_RE.match(name)) or "kubernetes.io/" in name:
        return (
            f"{name!r} is not an extended resource name: use <domain>/<name> as the device "
            "plugin advertises it under the node's allocatable resources (e.g. "
            "rdma/rdma_shared_device_a, nvidia.com/hostdev), or hugepages-<size> "
            "(e.g. hugepages-2Mi)"
        )
    return None


def quantity_problem(name: str, quantity: str) -> str | None:
    """Devices come in whole numbers (Kubernetes refuses '500m' of an extended resource)."""
    if not is_hugepages(name) and not _WHOLE_RE.match(quantity):
        return f"{quantity!r}: devices are counted in whole numbers, e.g. '1' ('0': none)"
    return None
