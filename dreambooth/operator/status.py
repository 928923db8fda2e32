"""The DreamBoothJob's phase machine, part two: the verdict -> the whole ``.status``.

Pure functions, no API calls. The handler calls :func:`compute_status` with the
:class:`~dreambooth.operator.verdict.Observation` of one pass and the previous status; it
writes the result in one patch (a merge patch replaces lists, so the full condition list
is always computed) and posts the Events that
:func:`dreambooth.operator.events.transition_events` derives. Phases and their precedence:
:mod:`dreambooth.operator.verdict`.

With ``spec.evaluation`` two more conditions: ``Overfitting`` (True with the first sign as
reason: ``Memorization``, ``DiversityCollapse``, ``PriorLossDrift``) and ``Underfitting``
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
from collections.abc import Sequence
from datetime import datetime, timedelta

from dreambooth.api import layout
from dreambooth.api.spec import OutputFormat
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
from dreambooth.operator.evaluation import evaluation_from, signs
from dreambooth.operator.pods import (
    Termination,
    Verdict,
    camel_reason,
    get,
    terminations,
    true_condition,
)
from dreambooth.operator.progress import (
    format_duration,
    is_stalled,
    progress_from,
    rfc3339,
    stalled_for,
)
from dreambooth.operator.restarts import attempt_end, restarts_before
from dreambooth.operator.verdict import (
    DEFAULT_STALL_TIMEOUT,
    RUNNING_PHASES,
    Observation,
    condition_of,
    ready_condition,
    verdict,
)

__all__ = [
    "BENIGN_PENDING",
    "CONDITION_TYPES",
    "DEFAULT_STALL_TIMEOUT",
    "Observation",
    "compute_status",
    "condition_of",
    "conditions_for",
    "invalid_spec_status",
    "verdict",
]

#: always all of them, in this order
CONDITION_TYPES = (
    ConditionType.READY,
    ConditionType.RUNNING,
    ConditionType.SUCCEEDED,
    ConditionType.FAILED,
    ConditionType.SUSPENDED,
    ConditionType.STALLED,
)

_MAX_MESSAGE = 32768


# --- conditions ---------------------------------------------------------------------------


def _condition(
    ctype: str,
    status: str,
    reason: str,
    message: str,
    previous: DreamBoothJobStatus | None,
    generation: int,
    now: datetime,
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
    v: Verdict,
    stalled: tuple[str, str, str],
    previous: DreamBoothJobStatus | None,
    generation: int,
    now: datetime,
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


def _outputs(
    v: Verdict, obs: Observation, previous: DreamBoothJobStatus | None, ended: list[Termination]
) -> Outputs | None:
    out = obs.out
    prev = previous.outputs if previous and previous.outputs else Outputs()
    samples = prev.samples
    if obs.samples and v.phase in (Phase.TRAINING, Phase.EXPORTING, Phase.SUCCEEDED):
        samples = out + layout.SAMPLES
    if v.phase is not Phase.SUCCEEDED:
        result = prev.model_copy(update={"samples": samples})
    else:
        written = next(
            (t.summary.outputs for t in reversed(ended) if t.exit_code == 0 and t.summary and t.summary.outputs), None
        )
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


def _progress(
    v: Verdict, obs: Observation, previous: DreamBoothJobStatus | None, ended: list[Termination], now: datetime
) -> Progress | None:
    before = previous.progress if previous else None
    progress = progress_from(obs.snapshot, before, now, obs.images_per_step, obs.total_steps)
    if (
        v.phase is Phase.TRAINING
        and progress is not None
        and (previous is None or previous.phase is not Phase.TRAINING)
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
        return base.model_copy(
            update={
                "step": step,
                "total_steps": total or step,
                "percent": percent,
                "summary": summary,
                "eta_seconds": 0,
                "loss": loss,
                "updated_at": stamp,
                "step_changed_at": stamp if base.step != step else base.step_changed_at,
            }
        )
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


def compute_status(obs: Observation, previous: DreamBoothJobStatus | None, now: datetime) -> DreamBoothJobStatus:
    """The whole status for ``obs``. Pure: same inputs, same status."""
    ended = terminations(obs.pods)
    job_status = get(obs.job, "status") or {}
    start_time = (previous.start_time if previous else None) or job_status.get("startTime")
    attempt = attempt_end(
        obs.job,
        obs.pods,
        nodes=obs.nodes,
        backoff_limit=obs.backoff_limit,
        previous_restarts=previous.restarts if previous else 0,
        deadline_seconds=obs.deadline_seconds,
        started_at=start_time,
        now=now,
    )
    v = verdict(obs, previous, attempt, start_time)
    if (
        previous is not None
        and previous.phase.finished
        and not v.phase.finished
        and _ready_reason(previous) != Reason.INVALID_SPEC
    ):  # finished is final: the Job may be gone (ttlSecondsAfterFinished)
        ready = ready_condition(previous)
        v = Verdict(previous.phase, ready.reason if ready else previous.phase.value, ready.message if ready else "")
    progress = _progress(v, obs, previous, ended, now)
    outputs = _outputs(v, obs, previous, ended)
    if v.phase in RUNNING_PHASES and not v.message:
        v = Verdict(v.phase, v.reason, _running_message(v.phase, progress))
    if v.phase is Phase.SUCCEEDED and not v.message:
        v = Verdict(v.phase, v.reason, _success_message(progress, outputs))

    checkpoint = previous.last_checkpoint if previous else None
    snap = obs.snapshot
    if (
        snap is not None
        and snap.last_checkpoint_step
        and (checkpoint is None or checkpoint.step != snap.last_checkpoint_step)
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
        completion_time = job_status.get("completionTime") or (finished or {}).get("lastTransitionTime") or rfc3339(now)

    conditions = conditions_for(v, _stalled(v, obs, progress, now), previous, obs.generation, now)
    evaluation = None
    if obs.evaluation is not None:  # spec.evaluation: figures, best checkpoint, Overfitting, Underfitting
        evaluation = evaluation_from(
            snap,
            previous,
            ended,
            out=obs.out,
            total_steps=obs.total_steps,
            formats=[f.value for f in obs.formats],
            now=now,
        )
        conditions += [
            _condition(*sign, previous, obs.generation, now)
            for sign in signs(evaluation, obs.evaluation, obs.total_steps)
        ]
        if (
            evaluation is not None
            and evaluation.best_checkpoint is not None
            and not (outputs is not None and outputs.best_checkpoint)
        ):
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


def _success_message(progress: Progress | None, outputs: Outputs | None) -> str:
    text = f"trained {progress.step} steps" if progress else "training finished"
    if outputs is not None:
        where = [
            f"{k} {u}"
            for k, u in (
                ("model", outputs.model),
                ("single file", outputs.single_file),
                ("LoRA", outputs.lora),
                ("kohya LoRA", outputs.lora_kohya),
                ("samples", outputs.samples),
            )
            if u
        ]
        text += "; " + ", ".join(where)
    return text


def _ready_reason(status: DreamBoothJobStatus | None) -> str | None:
    ready = ready_condition(status)
    return ready.reason if ready else None


def invalid_spec_status(
    issues: Sequence[str],
    generation: int,
    now: datetime,
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
