"""The children of a DreamBoothJob, built by pure functions of one :class:`TrainerInputs`.

``config_map`` (the TrainerConfig JSON), ``service`` (headless, for the rendezvous) and
``job`` (an Indexed batch/v1 Job, one pod per node) return plain dicts ready for the API:
no I/O, no clock, same input -> same output. Every child is owned by the DreamBoothJob,
so deleting the job deletes them. Credentials reach the pod only as ``secretKeyRef``s.

A single-node Job retries its pod itself (``backoffLimit``); a multi-node Job fails on the
first lost pod and the operator starts all pods again together (restarts.py), so a Job may
be one attempt of several: :class:`TrainerInputs` carries the restarts counted so far and
the seconds the job has been running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dreambooth.api.config import TrainerConfig, build_trainer_config
from dreambooth.api.exitcodes import DO_NOT_RETRY
from dreambooth.api.job import API_VERSION, KIND, DreamBoothJob
from dreambooth.api.pod import is_zero
from dreambooth.api.spec import SecretKeyRef
from dreambooth.api.termination import STOP_FILE, VERDICTS_DIR
from dreambooth.api.uris import Scheme, parse_uri
from dreambooth.operator import naming
from dreambooth.operator.restarts import RESTARTS_ANNOTATION
from dreambooth.operator.settings import OperatorSettings

CONTAINER = "trainer"
TRAINER_MODULE = "dreambooth.trainer"
VERDICT_MODULE = "dreambooth.trainer.verdict"
CONFIG_DIR = "/etc/dreambooth"
CONFIG_KEY = "config.json"
WORKDIR = "/tmp/dreambooth"
CACHE_DIR = "/var/cache/dreambooth"
PVC_ROOT = "/mnt/pvc"
TERMINATION_LOG = "/dev/termination-log"
RUN_AS = 1000

#: Multi-process pods run this shell as PID 1. It takes the pod's SIGTERM and asks the
#: training processes to stop by creating ``STOP`` in their work folder (they checkpoint and
#: exit "preempted"): torchrun never sees the signal, so it never kills a process that is
#: still writing a checkpoint, and its own shutdown timeout can stay short
#: (:data:`SHUTDOWN_TIMEOUT_SECONDS`: when one process fails, the others may be blocked in a
#: collective for good). ``accelerate launch`` exits 1 whatever its processes exit with: the
#: pod's verdict comes from every process's own (``python -m dreambooth.trainer.verdict``,
#: see dreambooth/api/termination.py), so a do-not-retry failure of any process reaches the
#: podFailurePolicy. No ``$(`` or ``$$`` here: Kubernetes would treat them as its own
#: variable references.
LAUNCH_SCRIPT = """\
work="${{DREAMBOOTH_WORKDIR:-{workdir}}}"
rm -rf "$work/{verdicts}" "$work/{stop}"
mkdir -p "$work"
trap 'touch "$work/{stop}"' TERM INT
{launch} &
child=$!
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
exec python -m {verdict} --processes {processes} --launcher-exit-code "$rc"
"""
#: how long torchrun waits for the other processes of a pod once one has failed, before it
#: kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch's default is 30 s)
SHUTDOWN_TIMEOUT_SECONDS = 15


def launch_script(launch: str, processes: int) -> str:
    """The shell a pod with ``processes`` training processes runs around ``launch``."""
    return LAUNCH_SCRIPT.format(launch=launch, processes=processes, workdir=WORKDIR,
                                verdicts=VERDICTS_DIR, stop=STOP_FILE, verdict=VERDICT_MODULE)


@dataclass(frozen=True)
class TrainerInputs:
    """Everything the builders read: a validated job (with name, namespace and uid, as the
    API server returns it), the operator's settings, and for a Job created after an earlier
    one: the restarts counted so far and the seconds since the job first started (its
    ``activeDeadlineSeconds`` counts from then)."""

    job: DreamBoothJob
    settings: OperatorSettings
    restarts: int = 0
    elapsed_seconds: int = 0

    def __post_init__(self) -> None:
        meta = self.job.metadata
        missing = [f for f in ("name", "namespace", "uid") if not getattr(meta, f)]
        if missing:
            raise ValueError(f"DreamBoothJob metadata lacks {', '.join(missing)}: build children "
                             "from the object the API server returned")

    @property
    def name(self) -> str:
        return self.job.metadata.name

    @cached_property
    def resolved(self) -> TrainerConfig:
        """The job's TrainerConfig before pvc:// rewriting (computed once per input)."""
        return build_trainer_config(self.job, self.settings.defaults())


@dataclass(frozen=True)
class ClaimMount:
    claim: str
    read_only: bool
    volume: str

    @property
    def mount_path(self) -> str:
        return f"{PVC_ROOT}/{self.claim}"


# --------------------------------------------------------------------------- config


def local_uri(uri: str) -> str:
    """``pvc://claim/path`` -> ``file:///mnt/pvc/claim/path``; other URIs unchanged."""
    parsed = parse_uri(uri, allowed=set(Scheme))
    if parsed.scheme is Scheme.FILE:
        raise ValueError(f"{uri}: file:// URIs are for local runs, not for a cluster")
    if parsed.scheme is not Scheme.PVC:
        return uri
    # a pvc:// path is literal and a file:// path percent-decoded: keep a '%' a '%'
    return f"file://{PVC_ROOT}/{parsed.authority}/{parsed.path.replace('%', '%25')}"


def _resolved(inputs: TrainerInputs) -> TrainerConfig:
    return inputs.resolved


def _uses(config: TrainerConfig) -> list[tuple[str, bool]]:
    """(URI, written to) for every storage URI the trainer reads or writes."""
    spec = config.spec
    uris = [(spec.base_model.uri, False), (spec.instance.uri, False), (config.output_uri, True)]
    return uris + [(uri, False) for uri in (spec.base_model.vae, spec.prior.uri) if uri]


def claim_mounts(inputs: TrainerInputs) -> list[ClaimMount]:
    """The PersistentVolumeClaims the job names: read-write if written to, else read-only."""
    writable: dict[str, bool] = {}
    for uri, written in _uses(_resolved(inputs)):
        parsed = parse_uri(uri, allowed=set(Scheme))
        if parsed.scheme is Scheme.PVC:
            writable[parsed.authority] = writable.get(parsed.authority, False) or written
    return [
        ClaimMount(claim, read_only=not writable[claim], volume=f"pvc-{i}")
        for i, claim in enumerate(sorted(writable))
    ]


def trainer_config(inputs: TrainerInputs) -> TrainerConfig:
    """The TrainerConfig the pods read, pvc:// URIs rewritten to their mount paths."""
    config = _resolved(inputs)

    def rewritten(section: Any) -> Any:
        return section.model_copy(update={"uri": local_uri(section.uri)}) if section.uri else section

    def rewritten_spec(spec: Any) -> Any:
        base_model = rewritten(spec.base_model)
        if base_model.vae:
            base_model = base_model.model_copy(update={"vae": local_uri(base_model.vae)})
        return spec.model_copy(update={
            "base_model": base_model,
            "instance": rewritten(spec.instance),
            "prior": rewritten(spec.prior),
            "output": rewritten(spec.output),
        })

    return config.model_copy(update={
        "spec": rewritten_spec(config.spec),
        "requested": rewritten_spec(config.requested) if config.requested else None,
        "output_uri": local_uri(config.output_uri),
        "class_cache_uri": local_uri(config.class_cache_uri),
    })


# --------------------------------------------------------------------------- common


def owner_reference(job: DreamBoothJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(inputs: TrainerInputs, name: str, extra_labels: dict[str, str] | None = None):
    return {
        "name": name,
        "namespace": inputs.job.metadata.namespace,
        "labels": naming.labels(inputs.name) | (extra_labels or {}),
        "ownerReferences": [owner_reference(inputs.job)],
    }


def config_map(inputs: TrainerInputs) -> dict[str, Any]:
    text = json.dumps(trainer_config(inputs).wire(), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(inputs, naming.config_map_name(inputs.name)),
        "data": {CONFIG_KEY: text},
    }


def service(inputs: TrainerInputs) -> dict[str, Any]:
    """Headless: gives pod ``i`` the DNS name ``<job>-<i>.<service>``, even before it is ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(inputs, naming.service_name(inputs.name)),
        "spec": {
            "clusterIP": "None",
            "selector": naming.selector(inputs.name),
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": naming.RENDEZVOUS_PORT, "protocol": "TCP",
                 "targetPort": naming.RENDEZVOUS_PORT},
                {"name": "metrics", "port": inputs.settings.trainer_metrics_port,
                 "protocol": "TCP", "targetPort": "metrics"},
            ],
        },
    }


# --------------------------------------------------------------------------- the Job


def command(inputs: TrainerInputs) -> list[str]:
    """One process: the trainer itself; more: ``accelerate launch`` (see LAUNCH_SCRIPT)."""
    res = inputs.job.spec.resources
    if res.num_processes == 1:
        return ["python", "-m", TRAINER_MODULE]
    lines = [["accelerate", "launch", "--multi_gpu"],
             ["--num_processes", str(res.num_processes), "--num_machines", str(res.nodes)]]
    if res.nodes > 1:
        # static rendezvous (torchrun's default): pod 0's TCPStore waits this long for the
        # other pods, and they wait as long for it (without it: 900 s, torchrun's LaunchConfig)
        timeout = inputs.job.spec.run_policy.rendezvous_timeout_seconds
        lines += [["--machine_rank", f'"${{{naming.COMPLETION_INDEX_ENV}:?}}"'],
                  ["--main_process_ip", naming.rendezvous_host(inputs.name),
                   "--main_process_port", str(naming.RENDEZVOUS_PORT)],
                  ["--rdzv_conf", f"timeout={timeout}"]]
    lines += [["--mixed_precision", str(inputs.job.spec.training.mixed_precision),
               "--dynamo_backend", "no"], ["-m", TRAINER_MODULE]]
    launch = " \\\n  ".join(" ".join(line) for line in lines)
    return ["/bin/sh", "-c", launch_script(launch, max(1, res.gpus_per_node))]


def credentials(inputs: TrainerInputs) -> SecretKeyRef | None:
    """The job's Secret, else the operator's default Secret, else none."""
    ref = inputs.job.spec.storage.credentials_secret
    if ref is None and inputs.settings.credentials_secret:
        ref = SecretKeyRef(name=inputs.settings.credentials_secret)
    return ref


def _env(inputs: TrainerInputs) -> list[dict[str, Any]]:
    storage = trainer_config(inputs).storage
    env = [
        {"name": "DREAMBOOTH_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "DREAMBOOTH_WORKDIR", "value": WORKDIR},
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": naming.COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{naming.COMPLETION_INDEX_ANNOTATION}']"}}},
    ]
    if inputs.job.spec.resources.num_processes > 1:  # see LAUNCH_SCRIPT
        env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_TIMEOUT_SECONDS)})
    if storage.endpoint:
        scheme = "https" if storage.secure else "http"
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": f"{scheme}://{storage.endpoint}"})
    env.append({"name": "AWS_REGION", "value": storage.region})
    ref = credentials(inputs)
    if ref is not None:
        for var, key in (("AWS_ACCESS_KEY_ID", ref.access_key_key),
                         ("AWS_SECRET_ACCESS_KEY", ref.secret_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    return env + extra_env(inputs)


def extra_env(inputs: TrainerInputs) -> list[dict[str, Any]]:
    """The operator's defaults (trainer.env) with the job's spec.resources.env over them, per
    name, after the operator's own variables. Values are literal: Kubernetes would expand
    ``$(NAME)`` in them, so every ``$`` is written as ``$$`` (which it reads back as ``$``)."""
    merged = dict(inputs.settings.trainer_env)
    merged.update((var.name, var.value) for var in inputs.job.spec.resources.env)
    return [{"name": name, "value": value.replace("$", "$$")} for name, value in merged.items()]


def extra_resources(inputs: TrainerInputs) -> dict[str, str]:
    """The operator's defaults (trainer.extraResources) with the job's over them, per name;
    a zero drops the request. Never the job's GPU, which gpusPerNode requests."""
    res = inputs.job.spec.resources
    merged = dict(inputs.settings.trainer_extra_resources) | res.extra_resources
    return {name: amount for name, amount in sorted(merged.items())
            if name != res.gpu.resource_name and not is_zero(amount)}


def _resources(inputs: TrainerInputs) -> dict[str, Any]:
    """Requests = limits, as Kubernetes requires for extended resources (the GPU, RDMA
    devices) and hugepages; cpu and memory follow the same rule."""
    res = inputs.job.spec.resources
    amounts = {res.gpu.resource_name: str(res.gpus_per_node)} if res.gpus_per_node else {}
    amounts |= {k: v for k, v in (("cpu", res.cpu), ("memory", res.memory)) if v}
    amounts |= extra_resources(inputs)
    return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}


def _volumes(inputs: TrainerInputs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, the trainer's volume mounts)."""
    volumes = [
        {"name": "config", "configMap": {"name": naming.config_map_name(inputs.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory",
                                      "sizeLimit": inputs.job.spec.resources.shared_memory}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for claim in claim_mounts(inputs):
        volumes.append({"name": claim.volume, "persistentVolumeClaim": {
            "claimName": claim.claim, "readOnly": claim.read_only}})
        mounts.append({"name": claim.volume, "mountPath": claim.mount_path,
                       "readOnly": claim.read_only})
    return volumes, mounts


def _container(inputs: TrainerInputs, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    container = {
        "name": CONTAINER,
        "image": inputs.job.spec.resources.image or inputs.settings.trainer_image,
        "command": command(inputs),
        "env": _env(inputs),
        "ports": [
            {"name": "metrics", "containerPort": inputs.settings.trainer_metrics_port,
             "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": naming.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(inputs),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if not container["resources"]:
        del container["resources"]
    return container


def pod_template(inputs: TrainerInputs) -> dict[str, Any]:
    res = inputs.job.spec.resources
    volumes, mounts = _volumes(inputs)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job makes new pods
        "subdomain": naming.service_name(inputs.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": inputs.settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(inputs, mounts)],
        "volumes": volumes,
    }
    if res.node_selector:
        spec["nodeSelector"] = dict(sorted(res.node_selector.items()))
    if res.tolerations:
        spec["tolerations"] = [t.wire() for t in res.tolerations]
    if res.priority_class_name:
        spec["priorityClassName"] = res.priority_class_name
    return {
        "metadata": {
            "labels": naming.labels(inputs.name),
            "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER},
        },
        "spec": spec,
    }


def pod_failure_policy(nodes: int = 1) -> dict[str, Any]:
    """One node: disruptions (preemption, eviction, drain) do not count against
    backoffLimit; the trainer's do-not-retry exit codes fail the Job at once; anything else
    is retried by a new pod. Several nodes: any lost pod ends the attempt (backoffLimit 0),
    and a disruption fails the Job through its own rule, so that the Job's failure says it
    was one (the disrupted pod itself is gone within seconds) and the operator restarts all
    pods without counting it."""
    disruption = {"onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    return {"rules": [
        {"action": "Ignore" if nodes == 1 else "FailJob", **disruption},
        {"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER, "operator": "In",
            "values": sorted(int(code) for code in DO_NOT_RETRY)}},
    ]}


def job(inputs: TrainerInputs) -> dict[str, Any]:
    """The Indexed Job. A job with a Kueue queue label starts suspended: Kueue unsuspends it
    when it admits the workload (and owns ``spec.suspend`` from then on). Several nodes:
    ``backoffLimit`` 0, the operator restarts the whole group (restarts.py) and counts
    ``runPolicy.backoffLimit`` itself; ``activeDeadlineSeconds`` counts from the job's first
    start."""
    res, run = inputs.job.spec.resources, inputs.job.spec.run_policy
    kueue = naming.kueue_labels(inputs.job.metadata.labels)
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "suspend": run.suspend or naming.QUEUE_LABEL in kueue,
        "backoffLimit": run.backoff_limit if res.nodes == 1 else 0,
        "podFailurePolicy": pod_failure_policy(res.nodes),
        "podReplacementPolicy": "Failed",  # a rank's new pod waits for the old one to be gone
        "template": pod_template(inputs),
    }
    if run.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = max(1, run.active_deadline_seconds - max(0, inputs.elapsed_seconds))
    # no ttlSecondsAfterFinished on the Job: the operator deletes the DreamBoothJob after
    # its ttl and the Job follows; until then a missing Job means someone deleted it
    metadata = _metadata(inputs, naming.trainer_name(inputs.name), kueue)
    metadata["annotations"] = {RESTARTS_ANNOTATION: str(inputs.restarts)}  # see restarts.py
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def children(inputs: TrainerInputs) -> list[dict[str, Any]]:
    """Every child, in creation order (the Job last: its pods mount the ConfigMap)."""
    return [config_map(inputs), service(inputs), job(inputs)]
