"""The phase machine, table-tested with small Job and pod builders: every phase and reason,
conditions that keep their transition times, restarts, times, outputs, stalls, events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator

from dreambooth.api import crd, effective_spec
from dreambooth.api.exitcodes import ExitCode
from dreambooth.api.spec import DreamBoothJobSpec, OutputFormat
from dreambooth.api.status import Condition, DreamBoothJobStatus, Phase
from dreambooth.operator.events import Event, transition_events
from dreambooth.operator.progress import TrainerSnapshot
from dreambooth.operator.status import (
    BENIGN_PENDING,
    CONDITION_TYPES,
    Observation,
    compute_status,
    invalid_spec_status,
)
from tests.support.jobs import make_job

T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
OUT = "s3://results/team-a/toy-cat/"
STATUS_SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# --- builders -------------------------------------------------------------------------------


def cond(
    ctype: str, reason: str = "", message: str = "", status: str = "True", when: str = "2026-11-24T11:00:00Z"
) -> dict[str, Any]:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": when}


def job(
    *,
    conditions=(),
    failed=0,
    active=0,
    succeeded=0,
    suspended=False,
    backoff_limit=3,
    deadline=None,
    start_time="2026-11-24T09:59:00Z",
    completion_time=None,
    restarts_before: int | None = None,
) -> dict[str, Any]:
    """A trainer Job; ``restarts_before``: its dreambooth.io/restarts annotation."""
    status: dict[str, Any] = {
        "active": active,
        "failed": failed,
        "succeeded": succeeded,
        "conditions": list(conditions),
    }
    if start_time and not suspended:
        status["startTime"] = start_time
    if completion_time:
        status["completionTime"] = completion_time
    spec: dict[str, Any] = {"suspend": suspended, "backoffLimit": backoff_limit}
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    meta: dict[str, Any] = {"name": "toy-cat-trainer", "namespace": "team-a"}
    if restarts_before is not None:
        meta["annotations"] = {"dreambooth.io/restarts": str(restarts_before)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec, "status": status}


def summary(code: ExitCode | int, reason: str | None = None, message: str = "", **extra) -> str:
    body = {"exitCode": int(code), "reason": reason, "message": message, **extra}
    return json.dumps({k: v for k, v in body.items() if v is not None})


def pod(
    name: str = "toy-cat-trainer-0-x1",
    *,
    index: int = 0,
    phase: str = "Running",
    waiting: tuple[str, str] | None = None,
    init_waiting: tuple[str, str] | None = None,
    terminated: dict[str, Any] | None = None,
    conditions=(),
    finished: str = "2026-11-24T10:30:00Z",
    deleting: bool = False,
) -> dict[str, Any]:
    """A trainer pod. ``terminated``: exitCode, reason, message (the termination message)."""
    state: dict[str, Any] = {"running": {"startedAt": "2026-11-24T10:00:00Z"}}
    if waiting:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    if terminated is not None:
        state = {"terminated": {"finishedAt": finished, **terminated}}
    status: dict[str, Any] = {
        "phase": phase,
        "podIP": "10.0.0.7",
        "conditions": list(conditions),
        "containerStatuses": [{"name": "trainer", "state": state, "ready": phase == "Running"}],
    }
    if init_waiting:
        status["initContainerStatuses"] = [
            {"name": "fetch", "state": {"waiting": {"reason": init_waiting[0], "message": init_waiting[1]}}}
        ]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "team-a",
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-24T10:31:00Z"
    return {"metadata": meta, "status": status}


def failed_pod(
    code: int,
    reason: str = "Error",
    message: str = "",
    name: str = "toy-cat-trainer-0-f1",
    finished: str = "2026-11-24T10:30:00Z",
    conditions=(),
    index: int = 0,
    deleting: bool = False,
) -> dict[str, Any]:
    return pod(
        name,
        index=index,
        phase="Failed",
        terminated={"exitCode": code, "reason": reason, "message": message},
        finished=finished,
        conditions=conditions,
        deleting=deleting,
    )


def succeeded_pod(outputs: dict[str, str] | None = None, step: int = 400, **extra) -> dict[str, Any]:
    message = summary(0, "Succeeded", step=step, outputs=outputs or {}, **extra)
    return pod(
        "toy-cat-trainer-0-ok", phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": message}
    )


def snap(phase: str = "training", step: int = 120, total: int = 400, **kw) -> TrainerSnapshot:
    kw.setdefault("loss", 0.1234)
    kw.setdefault("learning_rate", 2e-6)
    kw.setdefault("images_per_second", 8.0)
    return TrainerSnapshot(step=step, total_steps=total, phase=phase, **kw)


def obs(job_: dict | None = None, pods=(), snapshot: TrainerSnapshot | None = None, **kw) -> Observation:
    kw.setdefault("generation", 1)
    kw.setdefault("output_uri", OUT)
    kw.setdefault("total_steps", 400)
    kw.setdefault("images_per_step", 4)
    return Observation(job=job_, pods=tuple(pods), snapshot=snapshot, **kw)


def conditions(status: DreamBoothJobStatus) -> dict[str, Condition]:
    return {c.type: c for c in status.conditions}


def ready(status: DreamBoothJobStatus) -> Condition:
    return conditions(status)["Ready"]


SECRET_MISSING = ("CreateContainerConfigError", 'secret "minio-credentials" not found')
OOM = {"exitCode": 137, "reason": "OOMKilled", "message": ""}
UNSCHEDULABLE = cond(
    "PodScheduled", "Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", status="False"
)
RUNNING_JOB = job(active=1)

# --- the table ---------------------------------------------------------------------------------

CASES = [
    # id, observation, phase, Ready reason, substring of Ready message
    ("no Job yet", obs(None), Phase.PENDING, "Creating", "creating"),
    ("Job without pods", obs(job()), Phase.PENDING, "WaitingForPods", ""),
    ("pod not yet scheduled", obs(RUNNING_JOB, [pod(phase="Pending")]), Phase.PENDING, "Scheduling", ""),
    (
        "unschedulable",
        obs(RUNNING_JOB, [pod(phase="Pending", conditions=[UNSCHEDULABLE])]),
        Phase.PENDING,
        "Unschedulable",
        "Insufficient nvidia.com/gpu",
    ),
    (
        "scheduling gated (Kueue)",
        obs(
            RUNNING_JOB,
            [
                pod(
                    phase="Pending",
                    conditions=[cond("PodScheduled", "SchedulingGated", "Scheduling is blocked", status="False")],
                )
            ],
        ),
        Phase.PENDING,
        "SchedulingGated",
        "blocked",
    ),
    (
        "ErrImagePull",
        obs(RUNNING_JOB, [pod(phase="Pending", waiting=("ErrImagePull", "pull access denied"))]),
        Phase.PENDING,
        "ImagePullBackOff",
        "pull access denied",
    ),
    (
        "ImagePullBackOff",
        obs(
            RUNNING_JOB,
            [pod(phase="Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/trainer:nope"'))],
        ),
        Phase.PENDING,
        "ImagePullBackOff",
        "resources.image",
    ),
    (
        "init container image",
        obs(
            RUNNING_JOB,
            [pod(phase="Pending", waiting=("PodInitializing", ""), init_waiting=("ImagePullBackOff", "no such image"))],
        ),
        Phase.PENDING,
        "ImagePullBackOff",
        "no such image",
    ),
    (
        "credentials Secret missing",
        obs(RUNNING_JOB, [pod(phase="Pending", waiting=SECRET_MISSING)]),
        Phase.PENDING,
        "SecretNotFound",
        'create Secret "minio-credentials" in team-a',
    ),
    (
        "credentials Secret lacks a key",
        obs(
            RUNNING_JOB,
            [
                pod(
                    phase="Pending",
                    waiting=(
                        "CreateContainerConfigError",
                        "couldn't find key AWS_ACCESS_KEY_ID in Secret team-a/minio",
                    ),
                )
            ],
        ),
        Phase.PENDING,
        "SecretKeyNotFound",
        "accessKeyKey",
    ),
    (
        "other config error",
        obs(
            RUNNING_JOB,
            [pod(phase="Pending", waiting=("CreateContainerConfigError", "runAsNonRoot and image will run as root"))],
        ),
        Phase.PENDING,
        "CreateContainerConfigError",
        "runAsNonRoot",
    ),
    (
        "containers starting",
        obs(RUNNING_JOB, [pod(phase="Pending", waiting=("ContainerCreating", ""), conditions=[cond("PodScheduled")])]),
        Phase.PENDING,
        "ContainerCreating",
        "",
    ),
    (
        "one of two nodes unschedulable",
        obs(
            job(active=2),
            [pod(), pod("toy-cat-trainer-1-y", index=1, phase="Pending", conditions=[UNSCHEDULABLE])],
            snapshot=snap("initializing", step=0),
        ),
        Phase.PENDING,
        "Unschedulable",
        "toy-cat-trainer-1-y",
    ),
    ("running, metrics not read yet", obs(RUNNING_JOB, [pod()]), Phase.INITIALIZING, "Initializing", "base model"),
    ("initializing", obs(RUNNING_JOB, [pod()], snap("initializing", step=0)), Phase.INITIALIZING, "Initializing", ""),
    (
        "class images",
        obs(RUNNING_JOB, [pod()], snap("generating_class_images", step=0)),
        Phase.GENERATING_CLASS_IMAGES,
        "GeneratingClassImages",
        "class images",
    ),
    (
        "training",
        obs(RUNNING_JOB, [pod()], snap()),
        Phase.TRAINING,
        "Training",
        "step 120/400 (30.0%), loss 0.1234, ETA 2m20s",
    ),
    ("exporting", obs(RUNNING_JOB, [pod()], snap("exporting", step=400)), Phase.EXPORTING, "Exporting", "export"),
    (
        "trainer done, pod finishing",
        obs(RUNNING_JOB, [pod()], snap("succeeded", step=400)),
        Phase.EXPORTING,
        "Exporting",
        "",
    ),
    ("pods done, Job not yet Complete", obs(job(succeeded=1), [succeeded_pod()]), Phase.EXPORTING, "Exporting", ""),
    (
        "a pod failed, replacement coming",
        obs(
            job(failed=1),
            [
                failed_pod(
                    20,
                    message=summary(
                        ExitCode.STORAGE_UNAVAILABLE, "StorageUnavailable", "minio.minio.svc:9000 unreachable"
                    ),
                )
            ],
        ),
        Phase.PENDING,
        "Restarting",
        "StorageUnavailable (exit 20): minio.minio.svc:9000 unreachable",
    ),
    (
        "a pod was preempted",
        obs(
            job(),
            [
                failed_pod(
                    21,
                    message=summary(ExitCode.PREEMPTED, "Preempted", "stopped"),
                    conditions=[cond("DisruptionTarget", "PreemptionByScheduler")],
                )
            ],
        ),
        Phase.PENDING,
        "Preempted",
        "PreemptionByScheduler",
    ),
    (
        "terminating pods ignored",
        obs(job(failed=1), [pod(deleting=True), failed_pod(1)]),
        Phase.PENDING,
        "Restarting",
        "",
    ),
    (
        "Job complete",
        obs(job(conditions=[cond("Complete")], succeeded=1), [succeeded_pod()]),
        Phase.SUCCEEDED,
        "Succeeded",
        "trained 400 steps",
    ),
    (
        "success criteria met",
        obs(job(conditions=[cond("SuccessCriteriaMet", "CompletionsReached")]), []),
        Phase.SUCCEEDED,
        "Succeeded",
        "",
    ),
    (
        "backoff limit exceeded",
        obs(
            job(
                conditions=[cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
                failed=4,
            ),
            [failed_pod(1, message=summary(ExitCode.UNEXPECTED, "Unexpected", "RuntimeError: NCCL timeout"))],
        ),
        Phase.FAILED,
        "BackoffLimitExceeded",
        "failed 4 times (backoffLimit 3); last failure: pod toy-cat-trainer-0-f1: Unexpected (exit 1): RuntimeError: NCCL timeout",
    ),
    (
        "CUDA out of memory",
        obs(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")], failed=4),
            [
                failed_pod(
                    1, message=summary(1, "Unexpected", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
                )
            ],
        ),
        Phase.FAILED,
        "BackoffLimitExceeded",
        "CUDAOutOfMemory (exit 1): OutOfMemoryError",
    ),
    (
        "OOMKilled",
        obs(
            job(conditions=[cond("Failed", "BackoffLimitExceeded")], failed=4),
            [
                failed_pod(1, finished="2026-11-24T10:10:00Z", name="a"),
                pod("b", phase="Failed", terminated=OOM, finished="2026-11-24T10:20:00Z"),
            ],
        ),
        Phase.FAILED,
        "OOMKilled",
        "raise resources.memory",
    ),
    (
        "deadline exceeded",
        obs(
            job(
                conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")],
                deadline=3600,
            ),
            [pod()],
        ),
        Phase.FAILED,
        "DeadlineExceeded",
        "activeDeadlineSeconds (3600s): Job was active longer",
    ),
    (
        "bad data, not retried",
        obs(
            job(
                conditions=[
                    cond(
                        "Failed",
                        "PodFailurePolicy",
                        "Container trainer for pod team-a/x failed with exit code 11 matching FailJob rule at index 1",
                    )
                ]
            ),
            [
                failed_pod(
                    11,
                    message=summary(
                        ExitCode.BAD_DATA,
                        "BadData",
                        "no images found under s3://data/toy-cat/: upload them there, or fix the URI",
                    ),
                )
            ],
        ),
        Phase.FAILED,
        "BadData",
        "no images found under s3://data/toy-cat/",
    ),
    (
        "storage auth, FailureTarget first",
        obs(
            job(conditions=[cond("FailureTarget", "PodFailurePolicy")]),
            [
                failed_pod(1, name="older", finished="2026-11-24T10:00:00Z"),
                failed_pod(
                    12, message=summary(ExitCode.STORAGE_AUTH, "StorageAuth", "Access Denied: check the Secret")
                ),
            ],
        ),
        Phase.FAILED,
        "StorageAuth",
        "Access Denied: check the Secret",
    ),
    (
        "do-not-retry code, log tail as message",
        obs(
            job(conditions=[cond("Failed", "PodFailurePolicy")]),
            [failed_pod(13, message="Traceback ...\nNoSuchBucket: models")],
        ),
        Phase.FAILED,
        "NotFound",
        "NoSuchBucket: models",
    ),
    (
        "PodFailurePolicy without pods",
        obs(job(conditions=[cond("Failed", "PodFailurePolicy", "exit code 14")]), []),
        Phase.FAILED,
        "PodFailurePolicy",
        "exit code 14",
    ),
    (
        "other Job failure",
        obs(job(conditions=[cond("Failed", "MaxFailedIndexesExceeded", "too many")]), []),
        Phase.FAILED,
        "MaxFailedIndexesExceeded",
        "too many",
    ),
    (
        "spec suspended",
        obs(job(suspended=True, active=1), [pod(deleting=True)], suspend=True),
        Phase.SUSPENDED,
        "SuspendRequested",
        "set it to false to resume",
    ),
    (
        "Job suspended (Kueue)",
        obs(job(suspended=True, conditions=[cond("Suspended", "JobSuspended")]), []),
        Phase.SUSPENDED,
        "JobSuspended",
        "Kueue",
    ),
    (
        "finished beats suspend",
        obs(job(conditions=[cond("Complete")]), [succeeded_pod()], suspend=True),
        Phase.SUCCEEDED,
        "Succeeded",
        "",
    ),
]


@pytest.mark.parametrize(
    ("observation", "phase", "reason", "message"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_phase_machine(observation, phase, reason, message):
    status = compute_status(observation, None, T0)
    assert status.phase is phase
    assert ready(status).reason == reason
    assert message in ready(status).message
    if phase is Phase.FAILED:
        failed = conditions(status)["Failed"]
        assert (failed.status, failed.reason, failed.message) == ("True", reason, ready(status).message)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CASES])
def test_every_status_is_valid_for_the_api_server(case):
    """All six conditions, CamelCase reasons, observedGeneration, and the CRD's schema."""
    status = compute_status(case[1], None, T0)
    assert [c.type for c in status.conditions] == list(CONDITION_TYPES)
    assert all(c.observed_generation == 1 for c in status.conditions)
    assert status.observed_generation == 1
    wire = status.wire()
    assert DreamBoothJobStatus.model_validate(wire) == status
    errors = list(OAS30Validator(STATUS_SCHEMA).iter_errors(wire))
    assert not errors, errors


@pytest.mark.parametrize(
    ("phase", "true_conditions"),
    [
        (Phase.PENDING, set()),
        (Phase.TRAINING, {"Running"}),
        (Phase.SUCCEEDED, {"Ready", "Succeeded"}),
        (Phase.FAILED, {"Failed"}),
        (Phase.SUSPENDED, {"Suspended"}),
    ],
)
def test_which_conditions_are_true(phase, true_conditions):
    observation = next(c[1] for c in CASES if c[2] is phase)
    status = compute_status(observation, None, T0)
    assert {c.type for c in status.conditions if c.status == "True"} == true_conditions


def test_false_conditions_carry_the_headline_reason():
    status = compute_status(obs(RUNNING_JOB, [pod(phase="Pending", waiting=SECRET_MISSING)]), None, T0)
    assert {c.reason for c in status.conditions if c.type != "Stalled"} == {"SecretNotFound"}
    assert ready(status).message and not conditions(status)["Running"].message


# --- lastTransitionTime, generations ----------------------------------------------------------


def test_conditions_keep_their_transition_time_until_their_status_changes():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=10)), None, at(0))
    s2 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=20)), s1, at(1))
    s3 = compute_status(
        obs(
            job(conditions=[cond("Failed", "PodFailurePolicy")]),
            [failed_pod(11, message=summary(11, "BadData", "bad"))],
        ),
        s2,
        at(2),
    )
    c1, c2, c3 = conditions(s1), conditions(s2), conditions(s3)
    assert c1["Running"].last_transition_time == "2026-11-24T10:00:00Z"
    assert c2["Running"].last_transition_time == "2026-11-24T10:00:00Z"  # still True
    assert c2["Ready"].message != c1["Ready"].message  # the message moved, the time did not
    assert c2["Ready"].last_transition_time == "2026-11-24T10:00:00Z"
    assert c3["Running"].last_transition_time == "2026-11-24T10:02:00Z"  # True -> False
    assert c3["Failed"].last_transition_time == "2026-11-24T10:02:00Z"
    assert c3["Ready"].last_transition_time == "2026-11-24T10:00:00Z"  # False all along
    assert c3["Ready"].reason == "BadData"


def test_conditions_carry_the_observed_generation():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], generation=1), None, at(0))
    s2 = compute_status(obs(job(suspended=True), [], generation=2, suspend=True), s1, at(1))
    assert {c.observed_generation for c in s2.conditions} == {2}
    assert s2.observed_generation == 2
    assert conditions(s2)["Suspended"].last_transition_time == "2026-11-24T10:01:00Z"


# --- finished is final, InvalidSpec -------------------------------------------------------------


def test_a_finished_job_stays_finished_when_its_job_is_gone():
    done = compute_status(
        obs(job(conditions=[cond("Complete")], completion_time="2026-11-24T12:00:00Z"), [succeeded_pod()]), None, at(0)
    )
    later = compute_status(obs(None, []), done, at(60))
    assert later == done


def test_a_failure_keeps_its_reason_once_pods_are_gone():
    failed = compute_status(
        obs(
            job(conditions=[cond("Failed", "PodFailurePolicy")]),
            [failed_pod(11, message=summary(11, "BadData", "bad image"))],
        ),
        None,
        at(0),
    )
    later = compute_status(obs(job(conditions=[cond("Failed", "PodFailurePolicy")]), []), failed, at(5))
    assert ready(later).reason == "PodFailurePolicy"  # refined from what is seen now...
    gone = compute_status(obs(None, []), failed, at(5))
    assert gone == failed  # ...but a deleted Job changes nothing


def test_invalid_spec():
    status = invalid_spec_status(["training.steps: must be >= 1", "instance.uri: bad scheme"], 3, T0)
    assert status.phase is Phase.FAILED
    c = conditions(status)
    assert (c["Failed"].status, c["Failed"].reason) == ("True", "InvalidSpec")
    assert "training.steps: must be >= 1; instance.uri: bad scheme" in c["Failed"].message
    assert c["Ready"].reason == "InvalidSpec" and c["Ready"].status == "False"
    assert {x.observed_generation for x in status.conditions} == {3}
    assert status.completion_time == "2026-11-24T10:00:00Z" and status.observed_generation == 3
    assert not list(OAS30Validator(STATUS_SCHEMA).iter_errors(status.wire()))
    again = invalid_spec_status(["training.steps: must be >= 1"], 3, at(5), status)
    assert c["Failed"].last_transition_time == conditions(again)["Failed"].last_transition_time
    assert again.completion_time == status.completion_time
    # a fixed spec (new generation) is not stuck in InvalidSpec
    fixed = compute_status(obs(None, [], generation=4), status, at(6))
    assert fixed.phase is Phase.PENDING and conditions(fixed)["Failed"].status == "False"


# --- restarts and times -------------------------------------------------------------------------


def test_restarts_count_failed_pods_not_preemptions():
    preempted = failed_pod(21, conditions=[cond("DisruptionTarget", "PreemptionByScheduler")])
    status = compute_status(obs(job(failed=2, active=1), [failed_pod(1), preempted, pod()]), None, T0)
    assert status.restarts == 2
    # a re-created Job starts counting from 0 again; the status does not go back
    assert compute_status(obs(job(active=1), [pod()]), status, at(1)).restarts == 2


def test_start_and_completion_times():
    pending = compute_status(obs(None), None, at(0))
    assert pending.start_time is None and pending.completion_time is None
    running = compute_status(obs(job(active=1, start_time="2026-11-24T09:59:00Z"), [pod()]), pending, at(1))
    assert running.start_time == "2026-11-24T09:59:00Z"
    done = compute_status(
        obs(job(conditions=[cond("Complete")], completion_time="2026-11-24T12:00:00Z"), [succeeded_pod()]),
        running,
        at(120),
    )
    assert (done.start_time, done.completion_time) == ("2026-11-24T09:59:00Z", "2026-11-24T12:00:00Z")
    failed = compute_status(
        obs(job(conditions=[cond("Failed", "DeadlineExceeded", when="2026-11-24T11:11:11Z")])), running, at(75)
    )
    assert failed.completion_time == "2026-11-24T11:11:11Z"


def test_start_time_without_a_job_start_time():
    status = compute_status(obs(job(start_time=None, active=1), [pod(phase="Pending")]), None, at(3))
    assert status.start_time == "2026-11-24T10:03:00Z"


# --- outputs ------------------------------------------------------------------------------------

D, S, L, K = OutputFormat.DIFFUSERS, OutputFormat.SAFETENSORS, OutputFormat.LORA, OutputFormat.LORA_KOHYA
COMPLETE = job(conditions=[cond("Complete")])
KOHYA = OUT + "lora/toy-cat_kohya.safetensors"


@pytest.mark.parametrize(
    ("formats", "model", "single_file", "lora", "kohya"),
    [
        ((D, S), OUT + "model/", OUT + "model.safetensors", None, None),
        ((D,), OUT + "model/", None, None, None),
        ((S,), None, OUT + "model.safetensors", None, None),
        ((L,), None, None, OUT + "lora/", None),
        ((K,), None, None, None, KOHYA),
        ((L, K), None, None, OUT + "lora/", KOHYA),
        ((D, S, L), OUT + "model/", OUT + "model.safetensors", OUT + "lora/", None),
    ],
)
def test_outputs_on_success_are_the_formats_asked_for(formats, model, single_file, lora, kohya):
    status = compute_status(obs(COMPLETE, [], formats=formats, name="toy-cat"), None, T0)
    o = status.outputs
    assert (o.model, o.single_file, o.lora, o.lora_kohya, o.samples) == (
        model,
        single_file,
        lora,
        kohya,
        OUT + "samples/",
    )


def test_outputs_reported_by_the_trainer_win():
    written = {"diffusers": "s3://elsewhere/model/", "samples": "s3://elsewhere/samples/"}
    status = compute_status(obs(COMPLETE, [succeeded_pod(written)], formats=(D, S)), None, T0)
    assert (status.outputs.model, status.outputs.single_file, status.outputs.samples) == (
        "s3://elsewhere/model/",
        None,
        "s3://elsewhere/samples/",
    )
    written = {"lora": "s3://elsewhere/lora/", "lora-kohya": "s3://elsewhere/lora/x_kohya.safetensors"}
    status = compute_status(obs(COMPLETE, [succeeded_pod(written)], formats=(L, K)), None, T0)
    assert (status.outputs.lora, status.outputs.lora_kohya) == (
        "s3://elsewhere/lora/",
        "s3://elsewhere/lora/x_kohya.safetensors",
    )
    assert "kohya LoRA s3://elsewhere/lora/x_kohya.safetensors" in ready(status).message


def test_samples_appear_once_training_started_and_the_model_only_at_the_end():
    out_no_slash = OUT.rstrip("/")
    init = compute_status(obs(RUNNING_JOB, [pod()], snap("initializing", step=0), output_uri=out_no_slash), None, at(0))
    assert init.outputs is None
    training = compute_status(obs(RUNNING_JOB, [pod()], snap(), output_uri=out_no_slash), init, at(1))
    assert training.outputs.samples == OUT + "samples/" and training.outputs.model is None
    failed = compute_status(obs(job(conditions=[cond("Failed", "BackoffLimitExceeded")])), training, at(2))
    assert failed.outputs.samples == OUT + "samples/" and failed.outputs.model is None


def test_no_samples_when_validation_is_off():
    training = compute_status(obs(RUNNING_JOB, [pod()], snap(), samples=False), None, T0)
    assert training.outputs is None
    done = compute_status(obs(COMPLETE, [], samples=False, formats=(L,)), training, at(1))
    assert (done.outputs.lora, done.outputs.samples) == (OUT + "lora/", None)


def test_observation_from_the_effective_spec():
    def spec(**training) -> DreamBoothJobSpec:
        return effective_spec(
            DreamBoothJobSpec.model_validate(
                make_job(
                    preset="face",
                    instance={"uri": "s3://data/me/", "prompt": "a photo of zwx person"},
                    training=training,
                    validation={"enabled": False},
                    runPolicy={"suspend": True},
                )["spec"]
            )
        )

    o = Observation.of(spec(method="lora"), generation=2, output_uri=OUT, job=None)
    assert o.formats == (L,) and o.suspend and not o.samples and o.generation == 2
    assert o.images_per_step == 2 * 2  # face: batch 2, prior preservation doubles it
    assert o.total_steps == 1200
    full = Observation.of(spec(), generation=1, output_uri=OUT, job=None)
    assert full.formats == (D, S)


# --- progress, checkpoints, stalls ------------------------------------------------------------------


def test_progress_and_checkpoint_in_the_status():
    status = compute_status(obs(RUNNING_JOB, [pod()], snap(step=100, last_checkpoint_step=100)), None, T0)
    p = status.progress
    assert (p.step, p.total_steps, p.percent, p.summary, p.eta_seconds) == (100, 400, 25.0, "100/400", 150)
    assert p.updated_at == "2026-11-24T10:00:00Z"
    assert status.last_checkpoint.step == 100
    assert status.last_checkpoint.uri == OUT + "checkpoints/checkpoint-100/"


def test_unreachable_metrics_keep_the_last_progress_and_phase():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=100, last_checkpoint_step=100)), None, at(0))
    s2 = compute_status(obs(RUNNING_JOB, [pod()], None), s1, at(1))
    assert s2.phase is Phase.TRAINING
    assert s2.progress == s1.progress and s2.last_checkpoint == s1.last_checkpoint
    assert conditions(s2)["Stalled"].status == "False"


def test_success_completes_the_progress():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=390)), None, at(0))
    s2 = compute_status(obs(COMPLETE, [succeeded_pod(step=400)]), s1, at(1))
    p = s2.progress
    assert (p.step, p.percent, p.summary, p.eta_seconds) == (400, 100.0, "400/400", 0)
    assert p.loss == s1.progress.loss  # the trainer's summary has no loss: the last scraped one
    assert compute_status(obs(COMPLETE, []), s2, at(2)) == s2  # stable once done


def test_success_shows_the_trainers_final_loss_not_the_last_scraped_one():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=390, loss=0.3)), None, at(0))
    s2 = compute_status(obs(COMPLETE, [succeeded_pod(step=400, loss=0.05)]), s1, at(1))
    assert (s2.progress.step, s2.progress.loss) == (400, 0.05)
    assert compute_status(obs(COMPLETE, [succeeded_pod(step=400, loss=0.05)]), s2, at(2)) == s2


def test_no_eta_when_not_running():
    s1 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=100)), None, at(0))
    s2 = compute_status(obs(job(suspended=True), [], suspend=True), s1, at(1))
    assert s2.progress.step == 100 and s2.progress.eta_seconds is None


def _training(step: int, minute: float, previous, snapshot=True, timeout=timedelta(minutes=10)):
    return compute_status(
        obs(RUNNING_JOB, [pod()], snap(step=step) if snapshot else None, stall_timeout=timeout),
        previous,
        at(minute),
    )


def test_stalled_when_the_step_does_not_move():
    s = _training(50, 0, None)
    assert conditions(s)["Stalled"].status == "False" and conditions(s)["Stalled"].reason == "Progressing"
    s = _training(50, 9, s)
    assert conditions(s)["Stalled"].status == "False"
    s = _training(50, 10, s)
    stalled = conditions(s)["Stalled"]
    assert (stalled.status, stalled.reason) == ("True", "NoProgress")
    assert stalled.message == "step 50/400 has not changed for 10m00s"
    assert s.phase is Phase.TRAINING  # a stall never fails the job
    s = _training(51, 11, s)
    assert conditions(s)["Stalled"].status == "False"


def test_stalled_when_the_endpoint_stays_unreachable():
    s = _training(50, 0, None)
    s = _training(50, 15, s, snapshot=False)
    stalled = conditions(s)["Stalled"]
    assert stalled.status == "True" and "unreachable (last read 2026-11-24T10:00:00Z)" in stalled.message


def test_the_stall_clock_restarts_when_training_resumes():
    """Class images, a restart or a suspension take as long as they take: not a stall."""
    s = _training(50, 0, None)
    s = compute_status(obs(job(suspended=True), [], suspend=True), s, at(5))
    s = compute_status(obs(RUNNING_JOB, [pod()], snap("initializing", step=0)), s, at(60))
    s = _training(0, 61, s)  # back in training, the new process has not finished a step
    assert conditions(s)["Stalled"].status == "False"
    assert s.progress.step == 50 and s.progress.step_changed_at == "2026-11-24T11:01:00Z"
    assert conditions(_training(0, 72, s))["Stalled"].status == "True"


def test_stall_is_unknown_without_any_metrics():
    s = compute_status(obs(RUNNING_JOB, [pod()], None), None, at(0))
    s = compute_status(obs(RUNNING_JOB, [pod()], None), s.model_copy(update={"phase": Phase.TRAINING}), at(1))
    assert (conditions(s)["Stalled"].status, conditions(s)["Stalled"].reason) == ("Unknown", "MetricsUnavailable")


# --- events -------------------------------------------------------------------------------------------


def test_events_for_a_run():
    s0 = compute_status(obs(None), None, at(0))
    s1 = compute_status(obs(RUNNING_JOB, [pod(phase="Pending", waiting=SECRET_MISSING)]), s0, at(1))
    s2 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=100, last_checkpoint_step=100)), s1, at(2))
    s3 = compute_status(obs(RUNNING_JOB, [pod()], snap(step=110, last_checkpoint_step=100)), s2, at(3))
    o4 = obs(
        job(failed=1, active=1),
        [
            pod("toy-cat-trainer-0-x1", phase="Failed", terminated=OOM),
            pod("toy-cat-trainer-0-x2", phase="Pending", waiting=("ContainerCreating", "")),
        ],
    )
    s4 = compute_status(o4, s3, at(4))
    o5 = obs(COMPLETE, [succeeded_pod()])
    s5 = compute_status(o5, s4, at(5))

    assert transition_events(None, s0) == []  # just created and waiting: nothing to tell yet
    (e1,) = transition_events(s0, s1)
    assert (e1.type, e1.reason) == ("Warning", "SecretNotFound") and "minio-credentials" in e1.message
    assert [(e.type, e.reason) for e in transition_events(s1, s2)] == [
        ("Normal", "Training"),
        ("Normal", "CheckpointSaved"),
    ]
    assert transition_events(s2, s3) == []  # progress alone makes no events
    events = transition_events(s3, s4, o4)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Pending"), ("Warning", "Restarted")]
    assert "OOMKilled (exit 137)" in events[1].message
    (done,) = transition_events(s4, s5, o5)
    assert (done.type, done.reason) == ("Normal", "Succeeded") and OUT + "model/" in done.message


def test_failure_event_carries_the_trainers_reason():
    before = compute_status(obs(RUNNING_JOB, [pod()], snap()), None, at(0))
    after = compute_status(
        obs(
            job(conditions=[cond("Failed", "PodFailurePolicy")]),
            [
                failed_pod(
                    12, message=summary(12, "StorageAuth", "s3://out/: Access Denied; check Secret minio-credentials")
                )
            ],
        ),
        before,
        at(1),
    )
    assert transition_events(before, after) == [
        Event(
            "Warning",
            "StorageAuth",
            "pod toy-cat-trainer-0-f1: StorageAuth (exit 12): s3://out/: "
            "Access Denied; check Secret minio-credentials (not retried)",
        )
    ]


def test_stall_events():
    s = _training(50, 0, None)
    stalled = _training(50, 10, s)
    moving = _training(51, 11, stalled)
    assert [(e.type, e.reason) for e in transition_events(s, stalled)] == [("Warning", "Stalled")]
    assert [(e.type, e.reason) for e in transition_events(stalled, moving)] == [("Normal", "Progressing")]


def test_benign_pending_reasons_make_no_warnings():
    s0 = compute_status(obs(None), None, at(0))
    for reason in sorted(BENIGN_PENDING - {"Creating", "Restarting"}):
        s1 = s0.model_copy(update={"conditions": [c.model_copy(update={"reason": reason}) for c in s0.conditions]})
        assert transition_events(s0, s1) == []


def test_the_operator_side_imports_no_torch_and_no_trainer():
    import subprocess
    import sys

    code = (
        "import sys, dreambooth.operator.status, dreambooth.operator.progress\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')"
        " or m.startswith('dreambooth.trainer')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
