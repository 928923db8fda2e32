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

__all__ = ["FAMILIES", "Components", "Conditioning", "Family", "SampleSize", "detect", "load_components", "load_vae"]

#: the field that names another VAE, for messages
VAE_FIELD = "spec.baseModel.vae"


def detect(path: Path, source: str, forced: str | None = None) -> Family:
    """The family of the model folder at ``path`` (``forced``: the job's ``baseModel.family``,
    which must agree with the folder)."""
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"{source} is not a model we can train: missing model_index.json; {FAMILIES['sd'].layout_hint()}"
        )
    kind = pipeline_class_of(path)
    found = next((f for f in FAMILIES.values() if kind in f.pipelines), None)
    if found is None:
        names = ", ".join(f"{f.title} ({', '.join(sorted(f.pipelines))})" for f in FAMILIES.values())
        raise ModelError(f"{source} holds a {kind or 'unknown'} model; these can be trained: {names}")
    if forced not in (None, "auto", found.name):
        raise ModelError(
            f"baseModel.family is {forced} but {source} holds a {found.title} model ({kind}): "
            f"set baseModel.family: {found.name} or auto, or point baseModel.uri at a "
            f"{FAMILIES[forced].title} folder"
        )
    return found


def load_components(path: Path, source: str, forced: str | None = None) -> Components:
    """Check the folder at ``path``, find its family and load its parts in float32."""
    family = detect(path, source, forced)
    family.check_layout(path, source)
    return family.load(path, source)


def load_vae(path: Path, source: str, components: Components):
    """The VAE folder at ``path`` (``baseModel.vae``: an ``AutoencoderKL`` as
    ``save_pretrained`` writes it, or a model folder with one in ``vae/``), in float32 and
    checked against ``components``' denoiser; it replaces their VAE."""
    import json

    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path, source = path / "vae", source.rstrip("/") + "/vae"
    hint = (
        "expected a folder written by AutoencoderKL.save_pretrained (config.json with "
        "_class_name AutoencoderKL, diffusion_pytorch_model.safetensors)"
    )
    config = path / "config.json"
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ModelError(f"{VAE_FIELD}: {source} is not a VAE: missing config.json; {hint}") from None
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"{VAE_FIELD}: {source}/config.json is not readable JSON ({err}); {hint}") from None
    if kind != "AutoencoderKL":
        raise ModelError(
            f"{VAE_FIELD}: {source}/config.json describes a {kind or 'model without _class_name'}, "
            f"not an AutoencoderKL; {hint}"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{VAE_FIELD}: {source} has no .safetensors weights (diffusion_pytorch_model.safetensors); {hint}"
        )
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{VAE_FIELD}: {source} could not be loaded ({str(err).splitlines()[0]}); {hint}") from None
    channels, wanted = vae.config.latent_channels, components.denoiser.config.in_channels
    if channels != wanted:
        raise ModelError(
            f"{VAE_FIELD}: {source} makes {channels}-channel latents but the base model's "
            f"{components.family.denoiser_name} takes {wanted}: use a VAE of the same family"
        )
    return vae
