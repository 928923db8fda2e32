"""The DreamBoothJob's phase machine, part one: what the operator saw -> phase + reason.

Pure functions, no API calls. Each reconcile pass the handler gathers an
:class:`Observation` (the spec's few relevant fields, the batch/v1 Job, its pods, rank 0's
metrics); :func:`verdict` gives its phase and headline reason, and
:func:`dreambooth.operator.status.compute_status` builds the whole ``.status`` around it.

Phases, in precedence order:

1. The Job's ``Complete``/``SuccessCriteriaMet`` -> Succeeded; ``Failed``/``FailureTarget``
   -> Failed, reason: the trainer's own (``BadData``, ``StorageAuth``, ... from the
   termination message) when the podFailurePolicy failed the Job, ``OOMKilled`` when the
   retries ran out on out-of-memory kills, else the Job's (``BackoffLimitExceeded``,
   ``DeadlineExceeded``). A finished job stays finished (even once its Job is deleted).
2. ``spec.runPolicy.suspend`` -> Suspended (``SuspendRequested``); a Job suspended by
   someone else (Kueue queueing it) -> Suspended (``JobSuspended``).
3. A pod that cannot start -> Pending with the cause: ``Unschedulable`` (and any other
   PodScheduled reason), ``ImagePullBackOff`` (also for ``ErrImagePull``),
   ``SecretNotFound``/``SecretKeyNotFound``/``ConfigMapNotFound`` (from
   ``CreateContainerConfigError``: the kubelet retries, so creating the Secret unblocks the
   job, and nothing crash-loops), or the container's waiting reason verbatim. The benign
   ``Creating``, ``WaitingForPods``, ``Scheduling``, ``ContainerCreating`` and
   ``Restarting`` (a pod failed, the Job controller makes a new one) say it is on its way.
   A multi-node job's failed Job is not final while runPolicy.backoffLimit allows: Pending,
   ``Restarting`` (or ``Preempted`` for a disruption, not counted) until all its pods start
   again together (restarts.py); ``Recreating`` while a Job deleted by hand leaves pods
   running or stopping.
4. All pods running -> the trainer's phase from its metrics (Initializing,
   GeneratingClassImages, Training, Exporting); unreadable metrics keep the last one.

With ``spec.evaluation`` two more: ``Overfitting`` (True with the first sign as reason:
``Memorization``, ``DiversityCollapse``, ``PriorLossDrift``) and ``Underfitting``
(``SubjectNotLearned``), from the latest evaluated round (operator/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dreambooth.api.resolve import images_per_step, total_steps
from dreambooth.api.spec import DreamBoothJobSpec, EvaluationThresholds, OutputFormat
from dreambooth.api.status import (
    BENIGN_PENDING,
    Condition,
    ConditionType,
    DreamBoothJobStatus,
    Phase,
    Reason,
)
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.operator.pods import (
    Termination,
    Verdict,
    camel_reason,
    get,
    is_active,
    pod_blocked,
    pod_name,
    terminations,
    true_condition,
)
from dreambooth.operator.progress import TrainerSnapshot
from dreambooth.operator.restarts import AttemptEnd, attempt_verdict, running_or_stopping

DEFAULT_STALL_TIMEOUT = timedelta(minutes=20)

RUNNING_PHASES = (Phase.INITIALIZING, Phase.GENERATING_CLASS_IMAGES, Phase.TRAINING, Phase.EXPORTING)
#: the trainer's phase metric label -> our phase ("succeeded": the pod is still finishing)
TRAINER_PHASE = {
    TrainerPhase.INITIALIZING: Phase.INITIALIZING,
    TrainerPhase.GENERATING_CLASS_IMAGES: Phase.GENERATING_CLASS_IMAGES,
    TrainerPhase.TRAINING: Phase.TRAINING,
    TrainerPhase.EXPORTING: Phase.EXPORTING,
    TrainerPhase.SUCCEEDED: Phase.EXPORTING,
}


# --- inputs and outputs ----------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the handler saw in one pass. Job and pods are API dicts (camelCase, as the API
    server sends them); pods are those of this job's Job, in any order."""

    generation: int
    output_uri: str  # e.g. s3://bucket/ns/name/ (a trailing slash is added when missing)
    total_steps: int
    formats: tuple[OutputFormat, ...] = (OutputFormat.DIFFUSERS, OutputFormat.SAFETENSORS)
    suspend: bool = False
    samples: bool = True  # validation.enabled: sample grids are written during training
    images_per_step: int = 1  # batch size, x2 with prior preservation (for the ETA)
    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    snapshot: TrainerSnapshot | None = None
    stall_timeout: timedelta = DEFAULT_STALL_TIMEOUT
    nodes: int = 1  # resources.nodes: more than one restarts all pods together
    backoff_limit: int = 3  # runPolicy.backoffLimit
    deadline_seconds: int | None = None  # runPolicy.activeDeadlineSeconds
    family: str | None = None  # baseModel.family when the job names it (auto: the trainer tells)
    name: str = "job"  # the DreamBoothJob's name (the kohya LoRA file is named after it)
    #: spec.evaluation.thresholds when the job evaluates its sample rounds, else None
    evaluation: EvaluationThresholds | None = None

    @classmethod
    def of(
        cls,
        spec: DreamBoothJobSpec,
        *,
        generation: int,
        output_uri: str,
        job: Mapping[str, Any] | None,
        pods: Sequence[Mapping[str, Any]] = (),
        snapshot: TrainerSnapshot | None = None,
        stall_timeout: timedelta = DEFAULT_STALL_TIMEOUT,
        name: str = "job",
    ) -> Observation:
        """From the *effective* spec (``dreambooth.api.effective_spec``: defaults filled)."""
        t = spec.training
        return cls(
            generation=generation,
            output_uri=output_uri,
            total_steps=total_steps(spec),
            formats=tuple(spec.output.formats or ()),
            suspend=spec.run_policy.suspend,
            samples=spec.validation.enabled,
            images_per_step=images_per_step(t.batch_size or 1, bool(spec.prior.enabled)),
            job=job,
            pods=tuple(pods),
            snapshot=snapshot,
            stall_timeout=stall_timeout,
            nodes=spec.resources.nodes,
            backoff_limit=spec.run_policy.backoff_limit,
            deadline_seconds=spec.run_policy.active_deadline_seconds,
            family=None if spec.base_model.family == "auto" else str(spec.base_model.family),
            name=name,
            evaluation=spec.evaluation.thresholds if spec.evaluation.enabled and spec.validation.enabled else None,
        )

    @property
    def out(self) -> str:
        return self.output_uri.rstrip("/") + "/"


# --- the verdict: phase + headline reason -------------------------------------------------


def _failed_verdict(cond: Mapping[str, Any], obs: Observation, ended: list[Termination]) -> Verdict:
    job_reason = cond.get("reason") or ""
    job_message = cond.get("message") or ""
    failures = [t for t in ended if t.exit_code != 0]
    latest = failures[-1] if failures else None
    if job_reason == Reason.POD_FAILURE_POLICY:
        culprit = next((t for t in reversed(failures) if t.do_not_retry), latest)
        if culprit is not None:
            return Verdict(Phase.FAILED, culprit.reason, f"{culprit.describe()} (not retried)")
        return Verdict(Phase.FAILED, Reason.POD_FAILURE_POLICY, job_message)
    if job_reason == Reason.DEADLINE_EXCEEDED:
        limit = get(obs.job, "spec", "activeDeadlineSeconds")
        text = "the job ran longer than runPolicy.activeDeadlineSeconds"
        text += f" ({limit}s)" if limit else ""
        return Verdict(Phase.FAILED, Reason.DEADLINE_EXCEEDED, f"{text}: {job_message}".rstrip(": "))
    if job_reason == Reason.BACKOFF_LIMIT_EXCEEDED:
        count = get(obs.job, "status", "failed") or len(failures)
        limit = get(obs.job, "spec", "backoffLimit")
        text = f"the trainer failed {count} times" + (f" (backoffLimit {limit})" if limit is not None else "")
        if latest is not None:
            text += f"; last failure: {latest.describe()}"
        return Verdict(
            Phase.FAILED, Reason.OOM_KILLED if latest and latest.oom else Reason.BACKOFF_LIMIT_EXCEEDED, text
        )
    text = job_message
    if latest is not None:
        text = f"{text}; last failure: {latest.describe()}" if text else latest.describe()
    return Verdict(Phase.FAILED, camel_reason(job_reason, Reason.JOB_FAILED), text)


def _attempt_verdict(obs: Observation, attempt: AttemptEnd, started_at: str | None) -> Verdict | None:
    return attempt_verdict(
        attempt,
        nodes=obs.nodes,
        backoff_limit=obs.backoff_limit,
        deadline_seconds=obs.deadline_seconds,
        started_at=started_at,
    )


def _without_job(obs: Observation, previous: DreamBoothJobStatus | None) -> Verdict:
    """No trainer Job: between two attempts of a multi-node job, gone (deleted by hand?)
    while its pods still stop, or not created yet."""
    ready = ready_condition(previous)
    if (
        previous is not None
        and previous.phase is Phase.PENDING
        and ready
        and ready.reason in (Reason.RESTARTING, Reason.PREEMPTED)
    ):
        return Verdict(Phase.PENDING, ready.reason, ready.message)
    left = sum(1 for p in obs.pods if running_or_stopping(p))
    if left:
        return Verdict(
            Phase.PENDING,
            Reason.RECREATING,
            f"the trainer Job is gone (deleted by hand?): waiting for its {left} pod(s) to stop "
            "before creating a new one, which resumes from the newest checkpoint",
        )
    return Verdict(Phase.PENDING, Reason.CREATING, "creating the trainer Job")


def verdict(
    obs: Observation,
    previous: DreamBoothJobStatus | None,
    attempt: AttemptEnd | None = None,
    started_at: str | None = None,
) -> Verdict:
    """The phase and headline reason of ``obs`` (messages of running phases are filled in
    by :func:`compute_status`, which knows the progress). ``attempt``: what the failed Job
    of a multi-node job means (restarts.py)."""
    job, ended = obs.job, terminations(obs.pods)
    if job is not None:
        for ctype in ("Complete", "SuccessCriteriaMet"):
            if true_condition(job, ctype):
                return Verdict(Phase.SUCCEEDED, Reason.SUCCEEDED)
        for ctype in ("Failed", "FailureTarget"):
            if cond := true_condition(job, ctype):
                if attempt is not None and (v := _attempt_verdict(obs, attempt, started_at)):
                    return v
                return _failed_verdict(cond, obs, ended)
    if obs.suspend:
        return Verdict(
            Phase.SUSPENDED,
            Reason.SUSPEND_REQUESTED,
            "spec.runPolicy.suspend is true: pods are stopped, checkpoints kept; set it to false to resume",
        )
    if job is not None and (get(job, "spec", "suspend") or true_condition(job, "Suspended")):
        return Verdict(
            Phase.SUSPENDED,
            Reason.JOB_SUSPENDED,
            "the Job is suspended (queued by Kueue, or suspended by hand); it resumes "
            "from its newest checkpoint when unsuspended",
        )
    if job is None:
        return _without_job(obs, previous)
    active = sorted((p for p in obs.pods if is_active(p)), key=pod_name)
    blocked = [v for v in map(pod_blocked, active) if v is not None]
    problem = next((v for v in blocked if v.reason not in BENIGN_PENDING), None)
    if problem or blocked:
        return problem or blocked[0]
    if not active:
        if any(t.exit_code == 0 for t in ended):
            return Verdict(Phase.EXPORTING, Reason.EXPORTING, "the trainer finished; the Job completes")
        failures = [t for t in ended if t.exit_code != 0]
        if failures:
            latest = failures[-1]
            reason = Reason.PREEMPTED if latest.disruption else Reason.RESTARTING
            again = (
                f"restarting all {obs.nodes} pods from the newest checkpoint"
                if obs.nodes > 1
                else "a new pod resumes from the newest checkpoint"
            )
            return Verdict(Phase.PENDING, reason, f"{latest.describe()}; {again}")
        return Verdict(Phase.PENDING, Reason.WAITING_FOR_PODS, "waiting for the Job controller to create pods")
    if obs.snapshot is not None and obs.snapshot.phase in TRAINER_PHASE:
        phase = TRAINER_PHASE[obs.snapshot.phase]
    elif previous is not None and previous.phase in RUNNING_PHASES:
        phase = previous.phase
    else:
        phase = Phase.INITIALIZING
    return Verdict(phase, phase.value)


def condition_of(status: DreamBoothJobStatus | None, ctype: str) -> Condition | None:
    """The condition of type ``ctype`` (None: no status, or no such condition)."""
    return next((c for c in (status.conditions if status else ()) if c.type == ctype), None)


def ready_condition(status: DreamBoothJobStatus | None) -> Condition | None:
    return condition_of(status, ConditionType.READY)
