"""Model families: every Stable Diffusion generation the trainer fine-tunes, behind one
small interface (:class:`~dreambooth.trainer.families.base.Family`). The family of a base
model is read from its ``model_index.json``; ``baseModel.family`` can force it."""

from __future__ import annotations

from pathlib import Path

from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.families.base import (
    Components,
    Conditioning,
    Family,
    SampleSize,
    pipeline_class_of,
)
from dreambooth.trainer.families.sd import StableDiffusion
from dreambooth.trainer.families.sd3 import StableDiffusion3
from dreambooth.trainer.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3())}

__all__ = ["FAMILIES", "Components", "Conditioning", "Family", "SampleSize", "detect", "load_components"]


def detect(path: Path, source: str, forced: str | None = None) -> Family:
    """The family of the model folder at ``path`` (``forced``: the job's ``baseModel.family``,
    which must agree with the folder)."""
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{source} is not a model we can train: missing model_index.json; "
                         f"{FAMILIES['sd'].layout_hint()}")
    kind = pipeline_class_of(path)
    found = next((f for f in FAMILIES.values() if kind in f.pipelines), None)
    if found is None:
        names = ", ".join(f"{f.title} ({', '.join(sorted(f.pipelines))})" for f in FAMILIES.values())
        raise ModelError(f"{source} holds a {kind or 'unknown'} model; these can be trained: {names}")
    if forced not in (None, "auto", found.name):
        raise ModelError(f"baseModel.family is {forced} but {source} holds a {found.title} model ({kind}): "
                         f"set baseModel.family: {found.name} or auto, or point baseModel.uri at a "
                         f"{FAMILIES[forced].title} folder")
    return found


def load_components(path: Path, source: str, forced: str | None = None) -> Components:
    """Check the folder at ``path``, find its family and load its parts in float32."""
    family = detect(path, source, forced)
    family.check_layout(path, source)
    return family.load(path, source)
