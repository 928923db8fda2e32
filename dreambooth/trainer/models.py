"""The base model: fetched from S3, the Hugging Face Hub or a local folder, checked, loaded.

We train Stable Diffusion 1.x/2.x diffusers folders (``StableDiffusionPipeline``). Anything
else fails early with a :class:`ModelError` that says what was found and what is expected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth.trainer.errors import (
    ModelError,
    NotFoundError,
    StorageAuthError,
    StorageUnavailableError,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
SUPPORTED_PIPELINES = frozenset({"StableDiffusionPipeline"})
#: what we download from a hub repository (no .bin duplicates, no fp16/ema variants)
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.model",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"]
LAYOUT_HINT = (
    "expected a diffusers Stable Diffusion 1.x/2.x folder as written by "
    "StableDiffusionPipeline.save_pretrained (model_index.json, unet/, vae/, text_encoder/, "
    "tokenizer/, scheduler/) with safetensors weights"
)


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training touches."""

    path: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be a multiple of this: VAE downsampling x UNet downsampling."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.down_block_types) - 1)
        return vae_factor * unet_factor


def check_layout(path: Path, source: str) -> None:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelError(f"{source} is not a model we can train: missing {', '.join(missing)}; {LAYOUT_HINT}")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except ValueError as err:
        raise ModelError(f"{source}/model_index.json is not valid JSON ({err})") from None
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise ModelError(
            f"{source} holds a {kind or 'unknown'} model; only Stable Diffusion 1.x/2.x "
            f"(StableDiffusionPipeline) can be trained: {LAYOUT_HINT}"
        )
    if not any((path / "unet").glob("*.safetensors")):
        raise ModelError(f"{source}/unet has no .safetensors weights; {LAYOUT_HINT}")


def fetch_from_hub(repo: str, revision: str | None, cache_dir: Path) -> Path:
    """Download (or reuse from the cache) a hub repository's diffusers folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
        )
    except GatedRepoError:
        raise StorageAuthError(
            f"hf://{repo} is gated: accept its license on huggingface.co and give the trainer an "
            "HF_TOKEN, or copy the model to S3 and use an s3:// URI"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise NotFoundError(
            f"hf://{repo}@{revision or 'main'} does not exist on the Hugging Face Hub (or is "
            "private: give the trainer an HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise StorageUnavailableError(
            f"the Hugging Face Hub cannot be reached for hf://{repo} and it is not in the cache: "
            "allow the trainer pods to reach huggingface.co, or copy the model to S3 "
            "(StableDiffusionPipeline.save_pretrained) and set baseModel.uri to that s3:// prefix"
        ) from None


def load_components(path: Path, source: str) -> Components:
    """Load the trainable parts of the pipeline at ``path`` in float32."""
    check_layout(path, source)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        components = Components(
            path=path,
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"{source} could not be loaded ({err}); {LAYOUT_HINT}") from None
    if components.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(
            f"{source}: scheduler prediction_type {components.prediction_type!r} is not supported "
            "(epsilon or v_prediction)"
        )
    log.info("loaded %s (%s prediction)", source, components.prediction_type)
    return components
