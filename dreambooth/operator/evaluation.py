"""``status.evaluation`` and the Overfitting / Underfitting conditions, from what the trainer
reports (pure). The figures come from rank 0's evaluation gauges while it runs and from
the trainer's termination summary once it has succeeded (the last round is drawn just
before the export, often after the last scrape); the signs are
:mod:`dreambooth.api.evaluation`'s, with the job's ``spec.evaluation.thresholds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from dreambooth.api import evaluation as judged
from dreambooth.api import layout
from dreambooth.api.spec import EvaluationThresholds
from dreambooth.api.status import (
    CheckpointRef,
    ConditionType,
    DreamBoothJobStatus,
    Evaluation,
    Reason,
)
from dreambooth.operator.pods import Termination
from dreambooth.operator.progress import TrainerSnapshot, rfc3339


def best_uri(step: int, out: str, total_steps: int, formats: Sequence[str]) -> str:
    """Where the weights of ``step`` are: its checkpoint, or the final model for the last step."""
    return out + (layout.final_model(formats) if step >= total_steps else layout.checkpoint(step))


def evaluation_from(
    snapshot: TrainerSnapshot | None,
    previous: DreamBoothJobStatus | None,
    ended: Sequence[Termination],
    *,
    out: str,
    total_steps: int,
    formats: Sequence[str],
    now: datetime,
) -> Evaluation | None:
    """The status's evaluation: the succeeded trainer's own, else the latest scrape, else
    what the status showed (a scrape without figures never erases them)."""
    before = previous.evaluation if previous else None
    final = next(
        (t.summary.evaluation for t in reversed(ended) if t.exit_code == 0 and t.summary and t.summary.evaluation), None
    )
    seen = final
    if seen is None and snapshot is not None and snapshot.evaluation is not None:
        best = None
        if snapshot.best_step is not None:
            best = CheckpointRef(step=snapshot.best_step, uri=best_uri(snapshot.best_step, out, total_steps, formats))
        seen = snapshot.evaluation.model_copy(update={"best_checkpoint": best})
    if seen is None:
        return before
    if before is not None and before.model_copy(update={"updated_at": None}) == seen.model_copy(
        update={"updated_at": None}
    ):
        return before  # unchanged: no new timestamp, no status churn
    return seen.model_copy(update={"updated_at": rfc3339(now)})


def signs(
    evaluation: Evaluation | None, thresholds: EvaluationThresholds, total_steps: int
) -> list[tuple[str, str, str, str]]:
    """``(type, status, reason, message)`` of the Overfitting and Underfitting conditions."""
    if evaluation is None:
        waiting = "no sample round evaluated yet"
        return [
            (ConditionType.OVERFITTING, "Unknown", Reason.NOT_EVALUATED, waiting),
            (ConditionType.UNDERFITTING, "Unknown", Reason.NOT_EVALUATED, waiting),
        ]
    figures = (
        f"step {evaluation.step}: subject fidelity {evaluation.subject_fidelity:.3f}, memorization "
        f"{evaluation.memorization:.3f}"
    )
    over = judged.overfitting_signs(evaluation, thresholds)
    if over:
        overfitting = ("True", over[0].value, judged.explain(over, evaluation, thresholds))
    else:
        overfitting = ("False", Reason.NO_SIGN, figures)
    base = evaluation.base_subject_fidelity
    if judged.underfitting(evaluation, base, total_steps, thresholds):
        sign = [judged.Sign.SUBJECT_NOT_LEARNED]
        underfitting = ("True", Reason.SUBJECT_NOT_LEARNED, judged.explain(sign, evaluation, thresholds, base))
    elif base is None:
        underfitting = ("Unknown", Reason.NOT_EVALUATED, "the base model's samples were not evaluated")
    else:
        underfitting = ("False", Reason.NO_SIGN, f"{figures}; the base model's subject fidelity {base:.3f}")
    return [(ConditionType.OVERFITTING, *overfitting), (ConditionType.UNDERFITTING, *underfitting)]
