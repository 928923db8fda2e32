"""The Kubernetes Events a status change implies (what ``kubectl describe dbj`` lists).

Pure: from the previous and the new status (and what was observed), the Events to post.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dreambooth.api.status import BENIGN_PENDING, ConditionType, DreamBoothJobStatus, Phase, Reason
from dreambooth.operator.pods import terminations
from dreambooth.operator.restarts import cause
from dreambooth.operator.verdict import Observation, condition_of


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event for the DreamBoothJob (posted by ``Kube.post_event``)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def transition_events(
    previous: DreamBoothJobStatus | None,
    current: DreamBoothJobStatus,
    obs: Observation | None = None,
) -> list[Event]:
    """The Events to emit for going from ``previous`` to ``current`` (empty: nothing new).

    A new phase -> Normal, reason = the phase; Failed -> Warning with the failure's reason
    and message; a Pending cause that needs the user (Unschedulable, SecretNotFound, ...)
    -> Warning; more restarts of a job that goes on -> Warning ``Restarted`` with the failure
    (a multi-node job's: the pod that ended the attempt); Stalled ->
    Warning ``Stalled`` (and Normal ``Progressing`` when it moves again); a newer checkpoint
    -> Normal ``CheckpointSaved``.
    """
    events: list[Event] = []
    ready, before = condition_of(current, ConditionType.READY), condition_of(previous, ConditionType.READY)
    reason = ready.reason if ready else current.phase.value
    message = ready.message if ready else ""
    phase_changed = previous is None or previous.phase is not current.phase
    problem = current.phase is Phase.PENDING and reason not in BENIGN_PENDING
    if previous is None and current.phase is Phase.PENDING and not problem:
        return events  # a job that was just created and waits: nothing to tell yet
    if phase_changed or (before is not None and before.reason != reason):
        if current.phase is Phase.FAILED or problem:
            events.append(Event("Warning", reason, message))
        elif phase_changed:
            events.append(Event("Normal", current.phase.value, message))
    if previous is not None and current.restarts > previous.restarts and not current.phase.finished:
        failures = [t for t in terminations(obs.pods) if t.exit_code != 0] if obs else []
        culprit = cause(obs.pods) if obs and obs.nodes > 1 else (failures[-1] if failures else None)
        text = f"the trainer was restarted ({current.restarts} so far)"
        if culprit is not None:
            text += f"; {culprit.describe()}"
        events.append(Event("Warning", Reason.RESTARTED, text))
    stalled = condition_of(current, ConditionType.STALLED)
    was_stalled = condition_of(previous, ConditionType.STALLED)
    if stalled is not None and stalled.status == "True" and (was_stalled is None or was_stalled.status != "True"):
        events.append(Event("Warning", Reason.STALLED, stalled.message))
    elif (
        was_stalled is not None
        and was_stalled.status == "True"
        and current.phase is Phase.TRAINING
        and (stalled is None or stalled.status == "False")
    ):
        events.append(Event("Normal", Reason.PROGRESSING, stalled.message if stalled else ""))
    old_cp = previous.last_checkpoint.step if previous and previous.last_checkpoint else None
    if current.last_checkpoint is not None and current.last_checkpoint.step != old_cp:
        events.append(
            Event(
                "Normal", Reason.CHECKPOINT_SAVED, f"step {current.last_checkpoint.step}: {current.last_checkpoint.uri}"
            )
        )
    return events
