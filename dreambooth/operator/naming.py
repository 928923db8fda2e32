"""Labels and deterministic names of a DreamBoothJob's children.

One base name serves the Indexed Job and its headless Service (they must agree: pod ``i``
is ``<trainer>-<i>.<trainer>``); the ConfigMap adds ``-config``. The Job controller names
pod ``i``'s hostname ``<job name>-<i>``, a DNS label of at most 63 characters, so the
trainer name is kept to :data:`MAX_TRAINER_NAME` characters: longer job names are cut and
get a stable hash, as do names starting with a digit (a Service name must start with a
letter). Same job name in, same names out.
"""

from __future__ import annotations

import hashlib

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
INSTANCE_LABEL = "app.kubernetes.io/instance"
#: selects every pod of one DreamBoothJob (the Service's selector)
JOB_NAME_LABEL = "dreambooth.io/job-name"

APP = "dreambooth"
COMPONENT = "trainer"
MANAGER = "dreambooth-operator"

#: Kueue reads these from the batch Job; the operator copies them from the DreamBoothJob.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (QUEUE_LABEL, KUEUE_PRIORITY_LABEL)

#: Kubernetes sets this annotation on every pod of an Indexed Job.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: the environment variable every trainer pod gets it in (the machine rank of multi-node runs)
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"

#: torch.distributed rendezvous on pod 0 (accelerate's --main_process_port)
RENDEZVOUS_PORT = 29500

#: the most trainer pods a job may ask for (``spec.resources.nodes``' bound)
MAX_NODES = 64
DNS_LABEL_MAX = 63
#: ``<trainer>-<largest index>`` must be a DNS label
MAX_TRAINER_NAME = DNS_LABEL_MAX - len(f"-{MAX_NODES - 1}")
TRAINER_SUFFIX = "-trainer"
CONFIG_SUFFIX = "-config"
_HASH_LEN = 8


def labels(job_name: str) -> dict[str, str]:
    """The labels of every child object and trainer pod (a PodMonitor selects on them)."""
    return {
        NAME_LABEL: APP,
        COMPONENT_LABEL: COMPONENT,
        MANAGED_BY_LABEL: MANAGER,
        INSTANCE_LABEL: job_name,
        JOB_NAME_LABEL: job_name,
    }


def selector(job_name: str) -> dict[str, str]:
    """Selects the trainer pods of one DreamBoothJob."""
    return {JOB_NAME_LABEL: job_name}


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def trainer_name(job_name: str) -> str:
    """Name of the batch Job and of the headless Service (the pods' subdomain).

    ``toy-cat`` gives ``toy-cat-trainer``; a name too long for the pod hostnames, or one
    starting with a digit, gives ``<cut name>-<hash>-trainer``.
    """
    plain = job_name + TRAINER_SUFFIX
    if job_name[:1].isalpha() and len(plain) <= MAX_TRAINER_NAME:
        return plain
    base = job_name if job_name[:1].isalpha() else f"dbj-{job_name}"
    room = MAX_TRAINER_NAME - len(TRAINER_SUFFIX) - 1 - _HASH_LEN
    return f"{base[:room].rstrip('-')}-{short_hash(job_name)}{TRAINER_SUFFIX}"


def service_name(job_name: str) -> str:
    """The headless Service: same name as the Job, so the pod subdomain matches."""
    return trainer_name(job_name)


def config_map_name(job_name: str) -> str:
    return trainer_name(job_name) + CONFIG_SUFFIX


def pod_hostname(job_name: str, index: int) -> str:
    """The hostname Kubernetes gives pod ``index`` of the Indexed Job."""
    return f"{trainer_name(job_name)}-{index}"


def rendezvous_host(job_name: str) -> str:
    """Pod 0's DNS name (``<job>-0.<service>``), resolvable from every pod of the job."""
    return f"{pod_hostname(job_name, 0)}.{service_name(job_name)}"


def kueue_labels(job_labels: dict[str, str]) -> dict[str, str]:
    """The Kueue labels of a DreamBoothJob, to be copied onto its batch Job."""
    return {key: job_labels[key] for key in KUEUE_LABELS if key in job_labels}
