"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet conditioned on its last hidden
state, epsilon or v-prediction (read from the scheduler), ``StableDiffusionPipeline``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.families.base import Components, Conditioning, Family, SampleSize, log


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipelines = frozenset({"StableDiffusionPipeline"})
    required_files = (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    )
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)

    def load(self, path: Path, source: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            components = Components(
                family=self,
                path=path,
                tokenizers=[CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")],
                text_encoders=[CLIPTextModel.from_pretrained(path, subfolder="text_encoder")],
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                denoiser=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            )
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{source} could not be loaded ({err}); {self.layout_hint()}") from None
        if components.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(
                f"{source}: scheduler prediction_type {components.prediction_type!r} is not "
                "supported (epsilon or v_prediction)"
            )
        log.info("loaded %s (%s, %s prediction)", source, self.title, components.prediction_type)
        return components

    def encode(
        self, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], prompts: list[str], device
    ) -> Conditioning:
        [tokenizer], [text_encoder] = tokenizers, text_encoders
        return Conditioning(text_encoder(tokenize(tokenizer, prompts, device))[0])

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, sizes: Sequence[SampleSize]) -> torch.Tensor:
        return denoiser(noisy, timesteps, cond.embeds).sample

    def pipeline(self, *, vae, text_encoders, tokenizers, denoiser, scheduler) -> Any:
        from diffusers import StableDiffusionPipeline

        [text_encoder], [tokenizer] = text_encoders, tokenizers
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_single_file(self, pipeline, path: Path) -> None:
        from dreambooth.trainer.single_file import save_single_file

        save_single_file(pipeline, path)

    def save_lora(self, pipeline, folder: Path) -> Path:
        type(pipeline).save_lora_weights(
            folder, **lora_parts(unet=pipeline.unet, text_encoder=pipeline.text_encoder), safe_serialization=True
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_lora_kohya(self, pipeline, path: Path) -> None:
        from dreambooth.trainer import kohya

        sd2 = pipeline.text_encoder.config.hidden_act == "gelu"  # OpenCLIP ViT-H
        kohya.save_kohya_lora(
            pipeline,
            path,
            [
                kohya.Part("lora_unet", pipeline.unet),
                kohya.Part("lora_te", pipeline.text_encoder, kohya.text_model_path),
            ],
            base_model=kohya.SD_V2 if sd2 else kohya.SD_V1,
        )


def lora_parts(*, peft_names: bool = False, **modules) -> dict[str, Any]:
    """``save_lora_weights``' arguments for the named parts' peft adapters: each part's
    ``<name>_lora_layers`` in diffusers' naming (``peft_names``: in peft's ``lora_A``/``lora_B``
    naming, which is what the transformer pipelines' loaders read: SD3's drops the UNet-style
    ``to_q.lora.down`` keys) and its ``<name>_lora_adapter_metadata`` (the LoRA config: without
    it a reader assumes alpha = rank, and an alpha set otherwise is lost)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    named = (lambda state: state) if peft_names else convert_state_dict_to_diffusers
    out: dict[str, Any] = {}
    for name, module in modules.items():
        config = getattr(module, "peft_config", None)
        out[f"{name}_lora_layers"] = named(get_peft_model_state_dict(module)) if config else None
        if config:
            out[f"{name}_lora_adapter_metadata"] = next(iter(config.values())).to_dict()
    return out
