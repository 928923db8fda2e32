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
from typing import Any

from dreambooth.api.exitcodes import DO_NOT_RETRY
from dreambooth.api.job import API_VERSION, KIND, DreamBoothJob
from dreambooth.operator import naming
from dreambooth.operator.podtemplate import CONFIG_KEY, CONTAINER, pod_template
from dreambooth.operator.restarts import RESTARTS_ANNOTATION
from dreambooth.operator.trainerinputs import TrainerInputs, trainer_config


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
                {
                    "name": "rendezvous",
                    "port": naming.RENDEZVOUS_PORT,
                    "protocol": "TCP",
                    "targetPort": naming.RENDEZVOUS_PORT,
                },
                {
                    "name": "metrics",
                    "port": inputs.settings.trainer_metrics_port,
                    "protocol": "TCP",
                    "targetPort": "metrics",
                },
            ],
        },
    }


# --------------------------------------------------------------------------- the Job


def pod_failure_policy(nodes: int = 1) -> dict[str, Any]:
    """One node: disruptions (preemption, eviction, drain) do not count against
    backoffLimit; the trainer's do-not-retry exit codes fail the Job at once; anything else
    is retried by a new pod. Several nodes: any lost pod ends the attempt (backoffLimit 0),
    and a disruption fails the Job through its own rule, so that the Job's failure says it
    was one (the disrupted pod itself is gone within seconds) and the operator restarts all
    pods without counting it."""
    disruption = {"onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    return {
        "rules": [
            {"action": "Ignore" if nodes == 1 else "FailJob", **disruption},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": sorted(int(code) for code in DO_NOT_RETRY),
                },
            },
        ]
    }


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
