"""Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, the second
with a projection), a UNet conditioned on both encoders' penultimate hidden states side by
side and on ``text_time`` added conditioning: the second encoder's pooled embedding and each
image's time ids (original size, crop top-left, target size), ``StableDiffusionXLPipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.families.base import Components, Conditioning, Family, SampleSize, log
from dreambooth.trainer.families.sd import lora_parts, tokenize


def time_ids(sizes: Sequence[SampleSize], device, dtype) -> torch.Tensor:
    """One row per sample: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in sizes], device=device, dtype=dtype)


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipelines = frozenset({"StableDiffusionXLPipeline"})
    required_files = (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    vae_in_fp32 = True  # its VAE overflows in fp16 (diffusers upcasts it too)
    #: SDXL 1.0 is made for 1024 px (its UNet's sample_size 128 x 8): 512 px or more
    min_native_share = 0.5

    def load(self, path: Path, source: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        try:
            components = Components(
                family=self,
                path=path,
                tokenizers=[CLIPTokenizer.from_pretrained(path, subfolder=name) for name in self.tokenizer_names],
                text_encoders=[
                    CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                    CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                ],
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                denoiser=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            )
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{source} could not be loaded ({err}); {self.layout_hint()}") from None
        unet = components.denoiser.config
        widths = [te.config.hidden_size for te in components.text_encoders]
        if unet.addition_embed_type != "text_time" or unet.cross_attention_dim != sum(widths):
            raise ModelError(
                f"{source}/unet is not an SDXL UNet for these text encoders (addition_embed_type "
                f"{unet.addition_embed_type!r}, cross_attention_dim {unet.cross_attention_dim}; "
                f"the encoders give {' + '.join(map(str, widths))}); {self.layout_hint()}"
            )
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
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
            out = text_encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unread_parameters(self, text_encoders: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
        # the first encoder is read at its penultimate layer and its pooled output is unused:
        # its last layer and final layer norm never reach the loss
        first = getattr(text_encoders[0], "text_model", text_encoders[0])  # transformers 5 flattened it
        return [*first.encoder.layers[-1].parameters(), *first.final_layer_norm.parameters()]

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, sizes: Sequence[SampleSize]) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": time_ids(sizes, noisy.device, cond.embeds.dtype)}
        return denoiser(noisy, timesteps, cond.embeds, added_cond_kwargs=added).sample

    def pipeline(self, *, vae, text_encoders, tokenizers, denoiser, scheduler) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=denoiser,
            scheduler=scheduler,
        )

    def save_single_file(self, pipeline, path: Path) -> None:
        from dreambooth.trainer.single_file_sdxl import save_sdxl_single_file

        save_sdxl_single_file(pipeline, path)

    def save_lora(self, pipeline, folder: Path) -> Path:
        type(pipeline).save_lora_weights(
            folder,
            **lora_parts(
                unet=pipeline.unet, text_encoder=pipeline.text_encoder, text_encoder_2=pipeline.text_encoder_2
            ),
            safe_serialization=True,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_lora_kohya(self, pipeline, path: Path) -> None:
        from dreambooth.trainer import kohya
        from dreambooth.trainer.single_file import unet_rules
        from dreambooth.trainer.single_file_sdxl import TEXT_TIME

        to_sgm = kohya.ldm_path(unet_rules(pipeline.unet.state_dict(), TEXT_TIME))  # kohya's SDXL UNet
        kohya.save_kohya_lora(
            pipeline,
            path,
            [
                kohya.Part("lora_unet", pipeline.unet, to_sgm),
                kohya.Part("lora_te1", pipeline.text_encoder, kohya.text_model_path),
                kohya.Part("lora_te2", pipeline.text_encoder_2, kohya.text_model_path),
            ],
            base_model=kohya.SDXL,
        )
