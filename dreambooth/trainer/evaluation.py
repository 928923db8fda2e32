"""The figures of a sample round from CLIP embeddings: pure functions of tensors (no model,
no family, no storage), so they are tested on embeddings whose answers are known.

Every similarity is the cosine of two embeddings. ``samples`` is one prompt's sample
embeddings ``[n, d]``, ``photos`` the instance photos' ``[m, d]``, ``text`` the prompt's
text embedding ``[d]``. The names and the score are :mod:`dreambooth.api.evaluation`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreambooth.api.evaluation import PromptFigures, Record


def similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` cosines."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_fidelity(samples: torch.Tensor, photos: torch.Tensor) -> float:
    """Mean similarity of every sample to every instance photo (the paper's CLIP-I)."""
    return similarities(samples, photos).mean().item()


def prompt_fidelity(samples: torch.Tensor, text: torch.Tensor) -> float:
    """Mean similarity of the samples to their prompt's text embedding (CLIP-T)."""
    return similarities(samples, text.reshape(1, -1)).mean().item()


def memorization(samples: torch.Tensor, photos: torch.Tensor) -> float:
    """The highest similarity of any sample to any training photo."""
    return similarities(samples, photos).max().item()


def sample_similarity(samples: torch.Tensor) -> float | None:
    """Mean pairwise similarity among the samples (1: all alike); None for a single sample."""
    n = samples.shape[0]
    if n < 2:
        return None
    sims = similarities(samples, samples)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def prior_loss_drift(current: float | None, first: float | None) -> float | None:
    """How far the class-image loss rose against its first value (0.5: 50% higher)."""
    if current is None or first is None or first <= 0:
        return None
    return current / first - 1.0


@dataclass(frozen=True)
class PromptSamples:
    prompt: str
    images: torch.Tensor  # [n, d]
    text: torch.Tensor | None = None  # [d]: only with a CLIP that has a text tower


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measure(
    step: int,
    prompts: Sequence[PromptSamples],
    photos: torch.Tensor,
    *,
    prior_loss: float | None = None,
    first_prior_loss: float | None = None,
    base: bool = False,
) -> Record:
    """The record of one round: per prompt and averaged over the prompts (every validation
    prompt counts as a subject prompt)."""
    rows = [
        PromptFigures(
            prompt=p.prompt,
            subject_fidelity=subject_fidelity(p.images, photos),
            prompt_fidelity=prompt_fidelity(p.images, p.text) if p.text is not None else None,
            memorization=memorization(p.images, photos),
            sample_similarity=sample_similarity(p.images),
        )
        for p in prompts
    ]
    return Record(
        step=step,
        base=base,
        subject_fidelity=_mean([r.subject_fidelity for r in rows]),
        prompt_fidelity=_mean([r.prompt_fidelity for r in rows]),
        memorization=_mean([r.memorization for r in rows]),
        sample_similarity=_mean([r.sample_similarity for r in rows]),
        prior_loss=prior_loss,
        prior_loss_drift=None if base else prior_loss_drift(prior_loss, first_prior_loss),
        prompts=rows,
    )
