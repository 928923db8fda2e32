"""What an evaluated sample round says: its figures, the signs of over- and underfitting, and
the best checkpoint. Pure (no torch): the trainer writes these records to
``evaluation.jsonl`` and its metrics, the operator reads the same figures into
``status.evaluation`` and its conditions, and a sweep can rank runs with the same score.

The figures (docs/evaluation.md), all cosine similarities of CLIP embeddings:

``subjectFidelity``   mean similarity of the samples to the instance photos (CLIP-I)
``promptFidelity``    mean similarity of each sample to its prompt's text (CLIP-T; needs a
                      CLIP with both towers)
``memorization``      per prompt, the highest similarity of any of its samples to any
                      training photo; averaged over the prompts
``sampleSimilarity``  per prompt, the mean pairwise similarity of its samples (1: all the
                      same, the diversity has collapsed); averaged over the prompts
``priorLossDrift``    the mean class-image loss since the previous round against that of
                      the first round, minus 1 (0.5: 50% higher); prior preservation only

The score that ranks checkpoints: ``subjectFidelity + promptFidelity`` (the latter counted
as 0 when not measured); a round with an overfitting sign ranks below every round without.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field

from dreambooth.api.spec import ApiModel, EvaluationThresholds


class Sign(StrEnum):
    """The reasons of the Overfitting and Underfitting conditions."""

    MEMORIZATION = "Memorization"
    DIVERSITY_COLLAPSE = "DiversityCollapse"
    PRIOR_LOSS_DRIFT = "PriorLossDrift"
    SUBJECT_NOT_LEARNED = "SubjectNotLearned"


class Figures(ApiModel):
    """The aggregate figures of one sample round."""

    step: int = Field(ge=0, description="The step the samples were drawn at (0: the base model).")
    subject_fidelity: float = Field(description="Mean similarity of the samples to the instance photos.")
    prompt_fidelity: float | None = Field(
        None, description="Mean similarity of each sample to its prompt (a CLIP with a text tower only)."
    )
    memorization: float = Field(
        description="Per prompt, the highest similarity of a sample to a training photo; mean over prompts."
    )
    sample_similarity: float | None = Field(
        None,
        description="Per prompt, the mean pairwise similarity of its samples; mean over prompts "
        "(1: no diversity left). Needs 2 or more images per prompt.",
    )
    prior_loss_drift: float | None = Field(
        None, description="Class-image loss since the last round against the first round's, minus 1."
    )


class PromptFigures(ApiModel):
    prompt: str
    subject_fidelity: float
    prompt_fidelity: float | None = None
    memorization: float
    sample_similarity: float | None = None


class Record(Figures):
    """One line of ``evaluation.jsonl``."""

    base: bool = Field(False, description="The base model's samples, before the first step.")
    prior_loss: float | None = Field(None, description="Mean class-image loss since the previous round.")
    #: the checkpoint of this step, relative to the job's prefix; the final model's folder for
    #: the last step; None when no checkpoint holds these weights
    checkpoint: str | None = None
    score: float | None = None
    signs: list[Sign] = Field(default_factory=list)
    prompts: list[PromptFigures] = Field(default_factory=list)


def score(figures: Figures) -> float:
    """The documented ranking score: subject fidelity + prompt fidelity (0 when not measured)."""
    return figures.subject_fidelity + (figures.prompt_fidelity or 0.0)


def overfitting_signs(figures: Figures, thresholds: EvaluationThresholds) -> list[Sign]:
    """The overfitting signs of a round, in a fixed order."""
    found = []
    if figures.memorization >= thresholds.memorization:
        found.append(Sign.MEMORIZATION)
    if figures.sample_similarity is not None and figures.sample_similarity >= thresholds.diversity_collapse:
        found.append(Sign.DIVERSITY_COLLAPSE)
    if figures.prior_loss_drift is not None and figures.prior_loss_drift >= thresholds.prior_loss_drift:
        found.append(Sign.PRIOR_LOSS_DRIFT)
    return found


def underfitting(
    figures: Figures, base_subject_fidelity: float | None, total_steps: int, thresholds: EvaluationThresholds
) -> bool:
    """True once ``underfittingShare`` of the steps is done and subject fidelity is still at
    most ``underfittingMargin`` above the base model's."""
    if base_subject_fidelity is None or not total_steps:
        return False
    if figures.step < thresholds.underfitting_share * total_steps:
        return False
    return figures.subject_fidelity - base_subject_fidelity <= thresholds.underfitting_margin


def best(records: Sequence[Record]) -> Record | None:
    """The best checkpoint: among rounds whose weights a checkpoint (or the final model)
    holds, those without an overfitting sign first, then the highest score, then the earliest."""
    eligible = [r for r in records if not r.base and r.checkpoint is not None]
    if not eligible:
        return None

    def rank(r: Record) -> tuple:
        overfit = any(s is not Sign.SUBJECT_NOT_LEARNED for s in r.signs)
        return overfit, -(r.score if r.score is not None else score(r)), r.step

    return min(eligible, key=rank)


def explain(
    signs: Sequence[Sign],
    figures: Figures,
    thresholds: EvaluationThresholds,
    base_subject_fidelity: float | None = None,
) -> str:
    """A condition message naming each sign with its figure and threshold."""
    parts = []
    for sign in signs:
        if sign is Sign.MEMORIZATION:
            parts.append(
                f"memorization {figures.memorization:.3f} >= {thresholds.memorization}: the samples "
                "reproduce the training photos"
            )
        elif sign is Sign.DIVERSITY_COLLAPSE:
            parts.append(
                f"sample similarity {figures.sample_similarity:.3f} >= {thresholds.diversity_collapse}: "
                "a prompt's samples are all alike"
            )
        elif sign is Sign.PRIOR_LOSS_DRIFT:
            parts.append(
                f"class-image loss {figures.prior_loss_drift:+.0%} against the first round "
                f"(threshold +{thresholds.prior_loss_drift:.0%}): the model forgets its class"
            )
        elif sign is Sign.SUBJECT_NOT_LEARNED:
            parts.append(
                f"subject fidelity {figures.subject_fidelity:.3f} is within "
                f"{thresholds.underfitting_margin} of the base model's {base_subject_fidelity:.3f} "
                f"at step {figures.step}: the subject does not appear"
            )
    text = "; ".join(parts)
    if signs and signs[0] is not Sign.SUBJECT_NOT_LEARNED:
        text += " (lower the learning rate or the steps; use the best checkpoint)"
    elif signs:
        text += " (raise the steps or the learning rate)"
    return f"step {figures.step}: {text}" if signs and signs[0] is not Sign.SUBJECT_NOT_LEARNED else text
