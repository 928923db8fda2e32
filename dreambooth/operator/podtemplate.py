"""The pod template of a trainer Job, by pure functions of one :class:`TrainerInputs`: the
command (the trainer itself, or ``accelerate launch`` inside :data:`LAUNCH_SCRIPT`), its
environment (credentials only as ``secretKeyRef``s), resources, volumes and the security
context of a non-root pod with a read-only root.
"""

from __future__ import annotations

from typing import Any

from dreambooth.api.pod import is_zero
from dreambooth.api.termination import STOP_FILE, VERDICTS_DIR
from dreambooth.operator import naming
from dreambooth.operator.trainerinputs import (
    TrainerInputs,
    claim_mounts,
    credentials,
    trainer_config,
)

CONTAINER = "trainer"
TRAINER_MODULE = "dreambooth.trainer"
VERDICT_MODULE = "dreambooth.trainer.verdict"
CONFIG_DIR = "/etc/dreambooth"
CONFIG_KEY = "config.json"
WORKDIR = "/tmp/dreambooth"
CACHE_DIR = "/var/cache/dreambooth"
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
    return LAUNCH_SCRIPT.format(
        launch=launch,
        processes=processes,
        workdir=WORKDIR,
        verdicts=VERDICTS_DIR,
        stop=STOP_FILE,
        verdict=VERDICT_MODULE,
    )


def command(inputs: TrainerInputs) -> list[str]:
    """One process: the trainer itself; more: ``accelerate launch`` (see LAUNCH_SCRIPT)."""
    res = inputs.job.spec.resources
    if res.num_processes == 1:
        return ["python", "-m", TRAINER_MODULE]
    lines = [
        ["accelerate", "launch", "--multi_gpu"],
        ["--num_processes", str(res.num_processes), "--num_machines", str(res.nodes)],
    ]
    if res.nodes > 1:
        # static rendezvous (torchrun's default): pod 0's TCPStore waits this long for the
        # other pods, and they wait as long for it (without it: 900 s, torchrun's LaunchConfig)
        timeout = inputs.job.spec.run_policy.rendezvous_timeout_seconds
        lines += [
            ["--machine_rank", f'"${{{naming.COMPLETION_INDEX_ENV}:?}}"'],
            [
                "--main_process_ip",
                naming.rendezvous_host(inputs.name),
                "--main_process_port",
                str(naming.RENDEZVOUS_PORT),
            ],
            ["--rdzv_conf", f"timeout={timeout}"],
        ]
    lines += [
        ["--mixed_precision", str(inputs.job.spec.training.mixed_precision), "--dynamo_backend", "no"],
        ["-m", TRAINER_MODULE],
    ]
    launch = " \\\n  ".join(" ".join(line) for line in lines)
    return ["/bin/sh", "-c", launch_script(launch, max(1, res.gpus_per_node))]


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
        {
            "name": naming.COMPLETION_INDEX_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{naming.COMPLETION_INDEX_ANNOTATION}']"}},
        },
    ]
    if inputs.job.spec.resources.num_processes > 1:  # see LAUNCH_SCRIPT
        env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_TIMEOUT_SECONDS)})
    if storage.endpoint:
        scheme = "https" if storage.secure else "http"
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": f"{scheme}://{storage.endpoint}"})
    env.append({"name": "AWS_REGION", "value": storage.region})
    ref = credentials(inputs)
    if ref is not None:
        for var, key in (("AWS_ACCESS_KEY_ID", ref.access_key_key), ("AWS_SECRET_ACCESS_KEY", ref.secret_key_key)):
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
    return {
        name: amount for name, amount in sorted(merged.items()) if name != res.gpu.resource_name and not is_zero(amount)
    }


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
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": inputs.job.spec.resources.shared_memory}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for claim in claim_mounts(inputs):
        volumes.append(
            {"name": claim.volume, "persistentVolumeClaim": {"claimName": claim.claim, "readOnly": claim.read_only}}
        )
        mounts.append({"name": claim.volume, "mountPath": claim.mount_path, "readOnly": claim.read_only})
    return volumes, mounts


def _container(inputs: TrainerInputs, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    container = {
        "name": CONTAINER,
        "image": inputs.job.spec.resources.image or inputs.settings.trainer_image,
        "command": command(inputs),
        "env": _env(inputs),
        "ports": [
            {"name": "metrics", "containerPort": inputs.settings.trainer_metrics_port, "protocol": "TCP"},
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
