"""What a model family is to the trainer: the small interface behind which SD 1.x/2.x,
SDXL and SD3 differ, so that the loop, the checkpoints and the export do not.

A family knows how to check and load its folder, how many text encoders it has and how to
turn prompts into the denoiser's conditioning, what extra conditioning a sample carries
(SDXL: each image's original size and crop), how a noisy latent and its training target are
drawn, which pipeline samples and exports it, and how its single file is laid out.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dreambooth.api.spec import TrainingSpec
from dreambooth.trainer.errors import ConfigError, ModelError
from dreambooth.trainer.families import noising
from dreambooth.trainer.families.noising import Noised

log = logging.getLogger("dreambooth.trainer")


@dataclass(frozen=True)
class SampleSize:
    """Where an image's training pixels came from: SDXL conditions on it (its time ids)."""

    original: tuple[int, int]  # (height, width) of the photo before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in resized pixels
    target: tuple[int, int]  # (height, width) trained at


@dataclass
class Conditioning:
    """What the text encoders give the denoiser for a batch of prompts."""

    embeds: torch.Tensor  # (batch, tokens, width): cross attention
    pooled: torch.Tensor | None = None  # (batch, width): SDXL's and SD3's pooled text embedding

    def rows(self) -> list[Conditioning]:
        return [
            Conditioning(self.embeds[i], None if self.pooled is None else self.pooled[i])
            for i in range(self.embeds.shape[0])
        ]

    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        pooled = [r.pooled for r in rows]
        return Conditioning(torch.stack([r.embeds for r in rows]), None if pooled[0] is None else torch.stack(pooled))


@dataclass
class Components:
    """The parts of a base model that training touches, loaded in float32."""

    family: Family
    path: Path
    denoiser: torch.nn.Module  # the UNet (SD, SDXL)
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    vae: torch.nn.Module
    noise_scheduler: Any

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be a multiple of this: VAE downsampling x denoiser downsampling."""
        return self.family.resolution_multiple(self)


class Family(ABC):
    """One model family. Instances hold no state: :data:`FAMILIES` keeps one of each."""

    #: ``baseModel.family``, status and metrics: sd, sdxl
    name: ClassVar[str]
    #: the ``_class_name`` values of ``model_index.json`` this family trains
    pipelines: ClassVar[frozenset[str]]
    #: files a folder of this family must have
    required_files: ClassVar[tuple[str, ...]]
    #: the denoiser's and the text encoders' folder names, which are also their names in
    #: checkpoints and in ``model_index.json``
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]]
    tokenizer_names: ClassVar[tuple[str, ...]]
    #: what a user reads in messages, e.g. "Stable Diffusion 1.x/2.x"
    title: ClassVar[str]
    #: the VAE encodes the photos in float32 whatever the mixed precision (SDXL's overflows
    #: in fp16)
    vae_in_fp32: ClassVar[bool] = False
    #: the smallest training.resolution, as a share of the model's native size (None: any)
    min_native_share: ClassVar[float | None] = None
    #: how many of the text encoders (the first ones) may train; the rest are always frozen
    #: (SD3's T5). None: all
    trainable_text_encoders: ClassVar[int | None] = None

    # --- the folder --------------------------------------------------------------------

    def layout_hint(self) -> str:
        return (
            f"expected a diffusers {self.title} folder as written by "
            f"{self.pipeline_name}.save_pretrained ({', '.join(self.required_files)}) "
            "with safetensors weights"
        )

    def check_layout(self, path: Path, source: str) -> None:
        missing = [name for name in self.required_files if not (path / name).is_file()]
        if missing:
            raise ModelError(
                f"{source} is not a {self.title} model we can train: missing {', '.join(missing)}; {self.layout_hint()}"
            )
        if not any((path / self.denoiser_name).glob("*.safetensors")):
            raise ModelError(f"{source}/{self.denoiser_name} has no .safetensors weights; {self.layout_hint()}")

    @abstractmethod
    def load(self, path: Path, source: str) -> Components:
        """The float32 parts of the checked folder at ``path``."""

    def check_resolution(self, components: Components, resolution: int) -> None:
        """Refuse a ``training.resolution`` (a multiple of the model's downsampling) below
        what this model takes (:class:`ConfigError`)."""
        if self.min_native_share is None:
            return
        multiple = components.resolution_multiple
        sample_size, factor = components.denoiser.config.sample_size, vae_factor(components.vae)
        native = sample_size * factor
        floor = max(multiple, int(native * self.min_native_share) // multiple * multiple)
        if resolution < floor:
            raise ConfigError(
                f"training.resolution {resolution} is below what this {self.title} model takes: it is made "
                f"for {native} px ({self.denoiser_name}/config.json sample_size {sample_size} x VAE factor "
                f"{factor}); train at {floor} px or more"
            )

    def configure(self, components: Components, training: TrainingSpec, source: str) -> None:
        """Fit the loaded parts to the job's training settings (SD3: T5's sequence length, or
        no T5); refuses, naming ``source``, what the folder cannot do. Default: nothing."""

    def resolution_multiple(self, components: Components) -> int:
        unet_factor = 2 ** (len(components.denoiser.config.down_block_types) - 1)
        return vae_factor(components.vae) * unet_factor

    # --- conditioning ------------------------------------------------------------------

    @abstractmethod
    def encode(
        self, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], prompts: list[str], device
    ) -> Conditioning:
        """The conditioning of ``prompts`` (gradients flow when the encoders train)."""

    def unread_parameters(self, text_encoders: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
        """Parameters of ``text_encoders`` that :meth:`encode` never reads (so they get no
        gradient): they stay frozen when the encoders train, or DDP would wait for them."""
        return []

    @abstractmethod
    def predict(
        self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, sizes: Sequence[SampleSize]
    ) -> torch.Tensor:
        """The denoiser's output for a batch (what the training target is compared with)."""

    def noised(
        self, scheduler, latents: torch.Tensor, noise: torch.Tensor, gens: list[torch.Generator], training: TrainingSpec
    ) -> Noised:
        """The noisy input, timesteps, training target and loss weights for ``latents`` and
        ``noise`` (one generator per sample draws the rest). Default: DDPM."""
        return noising.ddpm(scheduler, latents, noise, gens, training)

    # --- sampling and export -------------------------------------------------------------

    @property
    def pipeline_name(self) -> str:
        """The diffusers pipeline class that samples, draws class images and exports."""
        return min(self.pipelines)

    def sampling_options(self, training: TrainingSpec) -> dict[str, Any]:
        """Further arguments of the family's pipeline call for samples and class images."""
        return {}

    @abstractmethod
    def pipeline(self, *, vae, text_encoders, tokenizers, denoiser, scheduler) -> Any:
        """A diffusers pipeline of these parts (samples, class images, the export)."""

    @abstractmethod
    def save_single_file(self, pipeline, path: Path) -> None:
        """The whole model in its original single-file layout (A1111, ComfyUI)."""

    @abstractmethod
    def save_lora(self, pipeline, folder: Path) -> Path:
        """The pipeline's LoRA adapters in diffusers' format (``load_lora_weights``)."""

    @abstractmethod
    def save_lora_kohya(self, pipeline, path: Path) -> None:
        """The pipeline's LoRA adapters in one kohya/WebUI-format file (A1111, ComfyUI)."""


def vae_factor(vae) -> int:
    """How much the VAE shrinks an image per side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pipeline_class_of(path: Path) -> str | None:
    """``_class_name`` of ``model_index.json`` (None when missing or unreadable)."""
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
