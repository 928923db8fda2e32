"""The DreamBoothJob's phase machine: what the operator saw -> the whole ``.status``.

Pure functions, no API calls. Each reconcile pass the handler gathers an
:class:`Observation` (the spec's few relevant fields, the batch/v1 Job, its pods, rank 0's
metrics) and calls :func:`compute_status` with the previous status; it writes the result
in one patch (a merge patch replaces lists, so the full condition list is always computed)
and posts the Events that :func:`dreambooth.operator.events.transition_events` derives.

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

Conditions (metav1.Condition, always all six): ``Ready`` (True once the results are
ready; while False its reason and message are the headline: ``Training``, "step 120/400
(30.0%), loss 0.1234, ETA 4m10s", ``Unschedulable``, ...), ``Running`` (True while the
trainer runs), ``Succeeded``, ``Failed``, ``Suspended``, and ``Stalled`` (True when the
step has not moved for ``stall_timeout`` while training). A condition's
lastTransitionTime changes only when its status does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dreambooth.api import layout
from dreambooth.api.resolve import images_per_step, total_steps
from dreambooth.api.spec import DreamBoothJobSpec, EvaluationThresholds, OutputFormat
from dreambooth.api.status import (
    BENIGN_PENDING,
    CheckpointRef,
    Condition,
    ConditionType,
    DreamBoothJobStatus,
    Outputs,
    Phase,
    Progress,
    Reason,
    progress_summary,
)
from dreambooth.api.telemetry import TrainerPhase
from dreambooth.operator.evaluation import evaluation_from, signs
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
from dreambooth.operator.progress import (
    TrainerSnapshot,
    format_duration,
    is_stalled,
    progress_from,
    rfc3339,
    stalled_for,
)
from dreambooth.operator.restarts import (
    AttemptEnd,
    attempt_end,
    attempt_verdict,
    restarts_before,
    running_or_stopping,
)

DEFAULT_STALL_TIMEOUT = timedelta(minutes=20)

#: always all of them, in this order
CONDITION_TYPES = (ConditionType.READY, ConditionType.RUNNING, ConditionType.SUCCEEDED,
                   ConditionType.FAILED, ConditionType.SUSPENDED, ConditionType.STALLED)

RUNNING_PHASES = (Phase.INITIALIZING, Phase.GENERATING_CLASS_IMAGES, Phase.TRAINING, Phase.EXPORTING)
#: the trainer's phase metric label -> our phase ("succeeded": the pod is still finishing)
TRAINER_PHASE = {
    TrainerPhase.INITIALIZING: Phase.INITIALIZING,
    TrainerPhase.GENERATING_CLASS_IMAGES: Phase.GENERATING_CLASS_IMAGES,
    TrainerPhase.TRAINING: Phase.TRAINING,
    TrainerPhase.EXPORTING: Phase.EXPORTING,
    TrainerPhase.SUCCEEDED: Phase.EXPORTING,
}


_MAX_MESSAGE = 32768


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
        return Verdict(Phase.FAILED, Reason.OOM_KILLED if latest and latest.oom else Reason.BACKOFF_LIMIT_EXCEEDED, text)
    text = job_message
    if latest is not None:
        text = f"{text}; last failure: {latest.describe()}" if text else latest.describe()
    return Verdict(Phase.FAILED, camel_reason(job_reason, Reason.JOB_FAILED), text)


def _running_message(phase: Phase, progress: Progress | None) -> str:
    if phase is Phase.TRAINING and progress is not None and progress.total_steps:
        parts = [f"step {progress.summary} ({progress.percent:.1f}%)"]
        if progress.loss is not None:
            parts.append(f"loss {progress.loss:.4g}")
        if progress.eta_seconds is not None:
            parts.append(f"ETA {format_duration(progress.eta_seconds)}")
        return ", ".join(parts)
    return {
        Phase.INITIALIZING: "fetching the base model and instance images, resuming from a checkpoint if any",
        Phase.GENERATING_CLASS_IMAGES: "generating class images for prior preservation (cached for later jobs)",
        Phase.TRAINING: "training",
        Phase.EXPORTING: "exporting the final model",
    }[phase]


def _attempt_verdict(obs: Observation, attempt: AttemptEnd, started_at: str | None) -> Verdict | None:
    return attempt_verdict(attempt, nodes=obs.nodes, backoff_limit=obs.backoff_limit,
                           deadline_seconds=obs.deadline_seconds, started_at=started_at)


def _without_job(obs: Observation, previous: DreamBoothJobStatus | None) -> Verdict:
    """No trainer Job: between two attempts of a multi-node job, gone (deleted by hand?)
    while its pods still stop, or not created yet."""
    ready = _ready(previous)
    if previous is not None and previous.phase is Phase.PENDING and ready and ready.reason in (Reason.RESTARTING, Reason.PREEMPTED):
        return Verdict(Phase.PENDING, ready.reason, ready.message)
    left = sum(1 for p in obs.pods if running_or_stopping(p))
    if left:
        return Verdict(Phase.PENDING, Reason.RECREATING,
                       f"the trainer Job is gone (deleted by hand?): waiting for its {left} pod(s) to stop "
                       "before creating a new one, which resumes from the newest checkpoint")
    return Verdict(Phase.PENDING, Reason.CREATING, "creating the trainer Job")


def verdict(obs: Observation, previous: DreamBoothJobStatus | None,
            attempt: AttemptEnd | None = None, started_at: str | None = None) -> Verdict:
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
        return Verdict(Phase.SUSPENDED, Reason.SUSPEND_REQUESTED,
                       "spec.runPolicy.suspend is true: pods are stopped, checkpoints kept; "
                       "set it to false to resume")
    if job is not None and (get(job, "spec", "suspend") or true_condition(job, "Suspended")):
        return Verdict(Phase.SUSPENDED, Reason.JOB_SUSPENDED,
                       "the Job is suspended (queued by Kueue, or suspended by hand); it resumes "
                       "from its newest checkpoint when unsuspended")
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
            again = (f"restarting all {obs.nodes} pods from the newest checkpoint" if obs.nodes > 1
                     else "a new pod resumes from the newest checkpoint")
            return Verdict(Phase.PENDING, reason, f"{latest.describe()}; {again}")
        return Verdict(Phase.PENDING, Reason.WAITING_FOR_PODS, "waiting for the Job controller to create pods")
    if obs.snapshot is not None and obs.snapshot.phase in TRAINER_PHASE:
        phase = TRAINER_PHASE[obs.snapshot.phase]
    elif previous is not None and previous.phase in RUNNING_PHASES:
        phase = previous.phase
    else:
        phase = Phase.INITIALIZING
    return Verdict(phase, phase.value)


# --- conditions ---------------------------------------------------------------------------


def _condition(
    ctype: str, status: str, reason: str, message: str,
    previous: DreamBoothJobStatus | None, generation: int, now: datetime,
) -> Condition:
    old = next((c for c in (previous.conditions if previous else ()) if c.type == ctype), None)
    keep = old is not None and old.status == status
    return Condition(
        type=ctype,
        status=status,
        reason=camel_reason(reason, Reason.UNKNOWN),
        message=message[:_MAX_MESSAGE],
        last_transition_time=old.last_transition_time if keep else rfc3339(now),
        observed_generation=generation,
    )


def conditions_for(
    v: Verdict, stalled: tuple[str, str, str],
    previous: DreamBoothJobStatus | None, generation: int, now: datetime,
) -> list[Condition]:
    """All six conditions for verdict ``v``; ``stalled`` is (status, reason, message).

    Every condition's reason is the headline reason; the message goes on Ready and on the
    conditions that are True (``kubectl describe`` says it once)."""
    def make(ctype: str, true: bool, always: bool = False) -> Condition:
        message = v.message if true or always else ""
        return _condition(ctype, "True" if true else "False", v.reason, message, previous, generation, now)

    return [
        make(ConditionType.READY, v.phase is Phase.SUCCEEDED, always=True),
        make(ConditionType.RUNNING, v.phase in RUNNING_PHASES),
        make(ConditionType.SUCCEEDED, v.phase is Phase.SUCCEEDED),
        make(ConditionType.FAILED, v.phase is Phase.FAILED),
        make(ConditionType.SUSPENDED, v.phase is Phase.SUSPENDED),
        _condition(ConditionType.STALLED, *stalled, previous, generation, now),
    ]


# --- the status ---------------------------------------------------------------------------


def _outputs(v: Verdict, obs: Observation, previous: DreamBoothJobStatus | None,
             ended: list[Termination]) -> Outputs | None:
    out = obs.out
    prev = previous.outputs if previous and previous.outputs else Outputs()
    samples = prev.samples
    if obs.samples and v.phase in (Phase.TRAINING, Phase.EXPORTING, Phase.SUCCEEDED):
        samples = out + layout.SAMPLES
    if v.phase is not Phase.SUCCEEDED:
        result = prev.model_copy(update={"samples": samples})
    else:
        written = next((t.summary.outputs for t in reversed(ended)
                        if t.exit_code == 0 and t.summary and t.summary.outputs), None)
        if written:  # what the trainer reports it wrote
            result = Outputs(
                model=written.get(OutputFormat.DIFFUSERS.value),
                single_file=written.get(OutputFormat.SAFETENSORS.value),
                lora=written.get(OutputFormat.LORA.value),
                lora_kohya=written.get(OutputFormat.LORA_KOHYA.value),
                samples=written.get("samples") or samples,
                best_checkpoint=written.get("bestCheckpoint"),
            )
        elif prev.model or prev.single_file or prev.lora or prev.lora_kohya:
            result = prev
        else:  # the layout the trainer writes, for the formats asked for
            f = set(obs.formats)
            result = Outputs(
                model=out + layout.MODEL if OutputFormat.DIFFUSERS in f else None,
                single_file=out + layout.SINGLE_FILE if OutputFormat.SAFETENSORS in f else None,
                lora=out + layout.LORA if OutputFormat.LORA in f else None,
                lora_kohya=out + layout.lora_kohya(obs.name) if OutputFormat.LORA_KOHYA in f else None,
                samples=samples,
            )
    return result if any(result.model_dump().values()) else None


def _progress(v: Verdict, obs: Observation, previous: DreamBoothJobStatus | None,
              ended: list[Termination], now: datetime) -> Progress | None:
    before = previous.progress if previous else None
    progress = progress_from(obs.snapshot, before, now, obs.images_per_step, obs.total_steps)
    if v.phase is Phase.TRAINING and progress is not None and (
        previous is None or previous.phase is not Phase.TRAINING
    ):  # (re)entering training: the stall clock starts now, not at the last step seen
        progress = progress.model_copy(update={"step_changed_at": rfc3339(now)})
    if v.phase is Phase.SUCCEEDED:
        summaries = [t.summary for t in ended if t.exit_code == 0 and t.summary]
        total = (progress.total_steps if progress else 0) or obs.total_steps
        step = max([s.step for s in summaries if s.step is not None] or [total])
        # the trainer's own last loss; the last scrape may be a few steps older
        losses = [s.loss for s in summaries if s.loss is not None and math.isfinite(s.loss)]
        loss = losses[-1] if losses else (progress.loss if progress else None)
        if progress is not None and progress.step == step and progress.eta_seconds == 0 and progress.loss == loss:
            return progress
        base = progress or Progress()
        stamp = rfc3339(now)
        percent, summary = progress_summary(step, total or step)
        return base.model_copy(update={
            "step": step, "total_steps": total or step, "percent": percent, "summary": summary, "eta_seconds": 0,
            "loss": loss, "updated_at": stamp,
            "step_changed_at": stamp if base.step != step else base.step_changed_at,
        })
    if v.phase not in RUNNING_PHASES and progress is not None and progress.eta_seconds is not None:
        progress = progress.model_copy(update={"eta_seconds": None})
    return progress


def _stalled(v: Verdict, obs: Observation, progress: Progress | None, now: datetime) -> tuple[str, str, str]:
    if v.phase is not Phase.TRAINING:
        return "False", v.reason, ""
    if progress is None:
        return "Unknown", Reason.METRICS_UNAVAILABLE, "rank 0's metrics endpoint has not been read yet"
    if is_stalled(progress, now, obs.stall_timeout):
        idle = stalled_for(progress, now) or timedelta(0)
        text = f"step {progress.summary} has not changed for {format_duration(idle.total_seconds())}"
        if obs.snapshot is None:
            text += f"; rank 0's metrics endpoint is unreachable (last read {progress.updated_at})"
        return "True", Reason.NO_PROGRESS, text
    return "False", Reason.PROGRESSING, f"step {progress.summary}"


def compute_status(
    obs: Observation, previous: DreamBoothJobStatus | None, now: datetime
) -> DreamBoothJobStatus:
    """The whole status for ``obs``. Pure: same inputs, same status."""
    ended = terminations(obs.pods)
    job_status = get(obs.job, "status") or {}
    start_time = (previous.start_time if previous else None) or job_status.get("startTime")
    attempt = attempt_end(
        obs.job, obs.pods, nodes=obs.nodes, backoff_limit=obs.backoff_limit,
        previous_restarts=previous.restarts if previous else 0,
        deadline_seconds=obs.deadline_seconds, started_at=start_time, now=now,
    )
    v = verdict(obs, previous, attempt, start_time)
    if (
        previous is not None
        and previous.phase.finished
        and not v.phase.finished
        and _ready_reason(previous) != Reason.INVALID_SPEC
    ):  # finished is final: the Job may be gone (ttlSecondsAfterFinished)
        ready = _ready(previous)
        v = Verdict(previous.phase, ready.reason if ready else previous.phase.value,
                    ready.message if ready else "")
    progress = _progress(v, obs, previous, ended, now)
    outputs = _outputs(v, obs, previous, ended)
    if v.phase in RUNNING_PHASES and not v.message:
        v = Verdict(v.phase, v.reason, _running_message(v.phase, progress))
    if v.phase is Phase.SUCCEEDED and not v.message:
        v = Verdict(v.phase, v.reason, _success_message(progress, outputs))

    checkpoint = previous.last_checkpoint if previous else None
    snap = obs.snapshot
    if snap is not None and snap.last_checkpoint_step and (
        checkpoint is None or checkpoint.step != snap.last_checkpoint_step
    ):
        checkpoint = CheckpointRef(
                step=snap.last_checkpoint_step,
                uri=obs.out + layout.checkpoint(snap.last_checkpoint_step),
            )

    before = previous.restarts if previous else 0
    if attempt is not None:  # a multi-node attempt ended: counted once, whatever the polls
        restarts = max(before, attempt.restarts)
    else:  # the Job's failed pods (each resumed by a new pod), after those of earlier Jobs
        restarts = max(before, restarts_before(obs.job) + int(job_status.get("failed") or 0))
    if start_time is None and (obs.pods or v.phase in RUNNING_PHASES):
        start_time = rfc3339(now)
    completion_time = previous.completion_time if previous else None
    if v.phase.finished and completion_time is None:
        finished = true_condition(obs.job, "Failed") or true_condition(obs.job, "FailureTarget")
        completion_time = (
            job_status.get("completionTime")
            or (finished or {}).get("lastTransitionTime")
            or rfc3339(now)
        )

    conditions = conditions_for(v, _stalled(v, obs, progress, now), previous, obs.generation, now)
    evaluation = None
    if obs.evaluation is not None:  # spec.evaluation: figures, best checkpoint, Overfitting, Underfitting
        evaluation = evaluation_from(snap, previous, ended, out=obs.out, total_steps=obs.total_steps,
                                     formats=[f.value for f in obs.formats], now=now)
        conditions += [_condition(*sign, previous, obs.generation, now)
                       for sign in signs(evaluation, obs.evaluation, obs.total_steps)]
        if evaluation is not None and evaluation.best_checkpoint is not None and not (
                outputs is not None and outputs.best_checkpoint):
            outputs = (outputs or Outputs()).model_copy(update={"best_checkpoint": evaluation.best_checkpoint.uri})
    family = (snap.family if snap else None) or (previous.family if previous else None) or obs.family
    return DreamBoothJobStatus(
        phase=v.phase,
        conditions=conditions,
        progress=progress,
        family=family,
        last_checkpoint=checkpoint,
        evaluation=evaluation,
        outputs=outputs,
        restarts=restarts,
        start_time=start_time,
        completion_time=completion_time,
        observed_generation=obs.generation,
    )


def _success_message(progress: Progress | None, outputs: Outputs | None) -> str:
    text = f"trained {progress.step} steps" if progress else "training finished"
    if outputs is not None:
        where = [f"{k} {u}" for k, u in (("model", outputs.model), ("single file", outputs.single_file),
                                         ("LoRA", outputs.lora), ("kohya LoRA", outputs.lora_kohya),
                                         ("samples", outputs.samples)) if u]
        text += "; " + ", ".join(where)
    return text


def condition_of(status: DreamBoothJobStatus | None, ctype: str) -> Condition | None:
    """The condition of type ``ctype`` (None: no status, or no such condition)."""
    return next((c for c in (status.conditions if status else ()) if c.type == ctype), None)


def _ready(status: DreamBoothJobStatus | None) -> Condition | None:
    return condition_of(status, ConditionType.READY)


def _ready_reason(status: DreamBoothJobStatus | None) -> str | None:
    ready = _ready(status)
    return ready.reason if ready else None


def invalid_spec_status(
    issues: Sequence[str], generation: int, now: datetime,
    previous: DreamBoothJobStatus | None = None,
) -> DreamBoothJobStatus:
    """Failed with reason InvalidSpec: the spec cannot run as written (no Job is created)."""
    message = "the spec is invalid: " + "; ".join(issues or ["(no details)"])
    v = Verdict(Phase.FAILED, Reason.INVALID_SPEC, message)
    keep = previous is not None and previous.phase is Phase.FAILED
    return DreamBoothJobStatus(
        phase=Phase.FAILED,
        conditions=conditions_for(v, ("False", Reason.INVALID_SPEC, ""), previous, generation, now),
        progress=previous.progress if previous else None,
        family=previous.family if previous else None,
        last_checkpoint=previous.last_checkpoint if previous else None,
        evaluation=previous.evaluation if previous else None,
        outputs=previous.outputs if previous else None,
        restarts=previous.restarts if previous else 0,
        start_time=previous.start_time if previous else None,
        completion_time=(previous.completion_time if keep else None) or rfc3339(now),
        observed_generation=generation,
    )
