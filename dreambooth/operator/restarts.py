"""Whole-group restarts of multi-node jobs, and when a trainer Job may be created. Pure.

An Indexed Job replaces only the pod that failed: the other ranks of a multi-node run wait
in a collective for a peer that is gone (NCCL: until its watchdog fires, 10 minutes), and
the new pod meets the old pod 0's rendezvous. So the Job of a multi-node job is built with
``backoffLimit: 0`` and a podFailurePolicy whose first rule fails it on a
``DisruptionTarget`` pod (resources.py): any lost pod ends the attempt and the Job
controller stops the other pods at once. The operator then restarts the whole group, as
JobSet's failurePolicy recreates its child Jobs: it deletes the failed Job and, once no pod
of the job is running or stopping, creates a new one; all its pods start together and
resume from the newest complete checkpoint.

The budget is ``runPolicy.backoffLimit`` over the job's life: a failure counts, a
disruption (preemption, eviction, drain) does not, as the single-node Job's ``Ignore``
rule has it. Each Job carries the restarts counted before it was created
(:data:`RESTARTS_ANNOTATION`), so counting is idempotent across polls and operator
restarts: after a counted failure, ``restarts = max(previous, before + 1)``.

:func:`attempt_end` tells the phase machine (verdict.py) what a failed Job of a multi-node
job means; :func:`next_step` tells the handler what to do with the API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from dreambooth.api.status import ConditionType, DreamBoothJobStatus, Phase, Reason
from dreambooth.operator.pods import Termination, Verdict, get, terminations, true_condition
from dreambooth.operator.progress import format_duration, parse_time

#: on every trainer Job: the restarts counted before it was created
RESTARTS_ANNOTATION = "dreambooth.io/restarts"

#: the Job controller's message for a FailJob rule matched by a pod condition
_CONDITION_RULE = re.compile(r"^Pod (?P<ns>[^/\s]+)/(?P<pod>\S+) has condition (?P<type>\S+) matching")


class End(Enum):
    """What the failure of one attempt's Job means for the job."""

    FINAL = "final"  # not retried (a do-not-retry exit code, the Job's own deadline, ...)
    RESTART = "restart"  # a counted failure, budget left: all pods start again
    DISRUPTED = "disrupted"  # preemption, eviction, drain: all pods start again, not counted
    SPENT = "spent"  # a counted failure with runPolicy.backoffLimit used up
    OUT_OF_TIME = "outOfTime"  # runPolicy.activeDeadlineSeconds since the first start is over


@dataclass(frozen=True)
class AttemptEnd:
    end: End
    restarts: int  # counted restarts once this attempt is over (the status' value)
    cause: Termination | None  # the pod whose failure ended the attempt, when it is seen
    job_reason: str = ""
    job_message: str = ""

    @property
    def restarting(self) -> bool:
        return self.end in (End.RESTART, End.DISRUPTED)


def restarts_before(job: Mapping[str, Any] | None) -> int:
    """The restarts counted before ``job`` was created (0 without the annotation)."""
    raw = (get(job, "metadata", "annotations") or {}).get(RESTARTS_ANNOTATION)
    try:
        return max(0, int(raw)) if raw is not None else 0
    except (TypeError, ValueError):
        return 0


def failed_condition(job: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return true_condition(job, "Failed") or true_condition(job, "FailureTarget")


def cause(pods: Sequence[Mapping[str, Any]]) -> Termination | None:
    """The failure that ended an attempt: the first pod to fail by itself. Pods the Job
    controller deleted (a ``deletionTimestamp``) were stopped because of it. Finish times
    have one-second resolution: within the same second, a pod killed by a signal (the OOM
    killer, ``kill -9``: exit 128 + n) or disrupted comes first, as the others' collectives
    failed because it was gone."""
    own = [p for p in pods if not get(p, "metadata", "deletionTimestamp")]
    failures = [t for t in terminations(own) if t.exit_code != 0]
    if not failures:
        return None
    return min(failures, key=lambda t: (t.finished_at, not _killed(t), t.pod))


def _killed(t: Termination) -> bool:
    return t.oom or t.disruption is not None or (t.exit_code or 0) > 128


def _disrupted(cond: Mapping[str, Any], culprit: Termination | None) -> bool:
    found = _CONDITION_RULE.match(cond.get("message") or "")
    if found:
        return found.group("type") == "DisruptionTarget"
    # not the Job controller's message: the pods tell (a do-not-retry code wins)
    return culprit is not None and culprit.disruption is not None and not culprit.do_not_retry


def attempt_end(
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    *,
    nodes: int,
    backoff_limit: int,
    previous_restarts: int,
    deadline_seconds: int | None,
    started_at: str | None,
    now: datetime,
) -> AttemptEnd | None:
    """What the failed Job of a multi-node job means; None when there is nothing to decide
    (a single-node job, no Job, or a Job that has not failed)."""
    cond = failed_condition(job)
    if nodes <= 1 or cond is None:
        return None
    reason, message = cond.get("reason") or "", cond.get("message") or ""
    before = max(previous_restarts, restarts_before(job))
    culprit = cause(pods)

    def ended(end: End, counted: bool) -> AttemptEnd:
        restarts = max(previous_restarts, restarts_before(job) + 1) if counted else before
        return AttemptEnd(end, restarts, culprit, reason, message)

    if reason == Reason.POD_FAILURE_POLICY:
        if not _disrupted(cond, culprit):
            return ended(End.FINAL, counted=True)  # a do-not-retry exit code
        outcome = ended(End.DISRUPTED, counted=False)
    elif reason == Reason.BACKOFF_LIMIT_EXCEEDED:  # backoffLimit 0: any pod that failed by itself
        outcome = ended(End.RESTART, counted=True)
        if outcome.restarts > backoff_limit:
            return ended(End.SPENT, counted=True)
    else:  # DeadlineExceeded (the Job's own deadline), or what we do not know
        return ended(End.FINAL, counted=False)
    start = parse_time(started_at)
    if deadline_seconds is not None and start is not None and now - start >= timedelta(seconds=deadline_seconds):
        return AttemptEnd(End.OUT_OF_TIME, outcome.restarts, culprit, reason, message)
    return outcome


def describe_cause(attempt: AttemptEnd) -> str:
    if attempt.cause is not None:
        return attempt.cause.describe()
    found = _CONDITION_RULE.match(attempt.job_message)
    if found:
        return f"pod {found.group('pod')}: {found.group('type')}"
    return "a pod of the job failed"


def attempt_verdict(
    attempt: AttemptEnd, *, nodes: int, backoff_limit: int, deadline_seconds: int | None, started_at: str | None
) -> Verdict | None:
    """The phase and headline of a multi-node job whose attempt ended (None: FINAL, which
    the phase machine reports as the Job's failure)."""
    what = describe_cause(attempt)
    again = f"restarting all {nodes} pods from the newest checkpoint"
    if attempt.end is End.RESTART:
        return Verdict(
            Phase.PENDING, Reason.RESTARTING, f"{what}; {again} (restart {attempt.restarts} of at most {backoff_limit})"
        )
    if attempt.end is End.DISRUPTED:
        return Verdict(
            Phase.PENDING,
            Reason.PREEMPTED,
            f"{what}; {again} (a disruption: not counted against runPolicy.backoffLimit)",
        )
    if attempt.end is End.SPENT:
        reason = Reason.OOM_KILLED if attempt.cause is not None and attempt.cause.oom else Reason.BACKOFF_LIMIT_EXCEEDED
        return Verdict(
            Phase.FAILED,
            reason,
            f"the trainer failed {attempt.restarts} times "
            f"(runPolicy.backoffLimit {backoff_limit}); last failure: {what}",
        )
    if attempt.end is End.OUT_OF_TIME:
        spent = format_duration(float(deadline_seconds or 0))
        return Verdict(
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline_seconds}s = "
            f"{spent}, counted from its first start at {started_at}): not restarted; "
            f"last failure: {what}",
        )
    return None


# --- when the handler deletes or creates the trainer Job --------------------------------


class Step(Enum):
    NONE = "none"
    DELETE_JOB = "deleteJob"  # the attempt failed and the job restarts: its Job goes
    CREATE_JOB = "createJob"  # no Job and no pod running or stopping: a new Job (resumes)
    WAIT = "wait"  # no Job, but pods of the last one still run or stop


def running_or_stopping(pod: Mapping[str, Any]) -> bool:
    """Its containers may still run (and write): not Succeeded or Failed, deleted or not."""
    return get(pod, "status", "phase") not in ("Succeeded", "Failed")


def next_step(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], status: DreamBoothJobStatus) -> Step:
    """What to do with the trainer Job, given what was seen and the status just computed.

    Two generations of pods never run at once: a trainer Job is created only when no pod of
    the job is running or stopping (for single-node jobs too: a Job deleted by hand leaves
    its pod checkpointing on SIGTERM)."""
    if status.phase.finished:
        return Step.NONE
    if job is not None:
        ready = next((c for c in status.conditions if c.type == ConditionType.READY), None)
        if (
            failed_condition(job) is not None
            and status.phase is Phase.PENDING
            and ready is not None
            and ready.reason in (Reason.RESTARTING, Reason.PREEMPTED)
        ):
            return Step.DELETE_JOB
        return Step.NONE
    return Step.WAIT if any(running_or_stopping(p) for p in pods) else Step.CREATE_JOB


def active_seconds_left(deadline_seconds: int | None, started_at: str | None, now: datetime) -> int | None:
    """``activeDeadlineSeconds`` for a Job created now: the deadline counts from the job's
    first start (at least 1 s: a Job past it fails at once with DeadlineExceeded)."""
    if deadline_seconds is None:
        return None
    start = parse_time(started_at)
    if start is None:
        return deadline_seconds
    return max(1, deadline_seconds - int((now - start).total_seconds()))
