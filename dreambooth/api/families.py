"""What the API knows of each model family, so that a job naming its family
(``baseModel.family``) is checked before it runs; a job with ``auto`` is checked by the same
rules once the trainer has opened the model (dreambooth/trainer/families)."""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth.api.presets import ModelFamily
from dreambooth.api.spec import OutputFormat


@dataclass(frozen=True)
class FamilyFacts:
    title: str
    #: the output formats the trainer can write for this family
    formats: frozenset[OutputFormat]
    textual_inversion: bool
    #: the smallest training.resolution the family is trained for (below it, samples are noise)
    min_resolution: int


FACTS: dict[ModelFamily, FamilyFacts] = {
    ModelFamily.SD: FamilyFacts("Stable Diffusion 1.x/2.x", frozenset(OutputFormat), textual_inversion=True,
                                min_resolution=64),
    ModelFamily.SDXL: FamilyFacts("Stable Diffusion XL", frozenset({OutputFormat.DIFFUSERS, OutputFormat.LORA}),
                                  textual_inversion=False, min_resolution=64),
}
