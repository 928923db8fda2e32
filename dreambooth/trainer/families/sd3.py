"""Stable Diffusion 3 / 3.5: an MMDiT transformer (``SD3Transformer2DModel``) trained by
flow matching, three text encoders (CLIP-L and CLIP-G with projections, T5),
``StableDiffusion3Pipeline``.

The prompt, as the pipeline builds it: both CLIP encoders' penultimate hidden states side by
side, zero-padded to T5's width, then T5's states (``training.maxSequenceLength`` tokens)
along the sequence; the pooled embedding is both CLIP projections side by side. With
``training.t5: drop`` T5's part is zeros of the transformer's ``joint_attention_dim``, as the
pipeline gives without ``text_encoder_3``. T5 never trains (only the CLIP encoders may take
LoRA adapters), so its states are computed once per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dreambooth.api.spec import T5Mode, TrainingSpec
from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.families import noising
from dreambooth.trainer.families.base import (
    Components,
    Conditioning,
    Family,
    Noised,
    SampleSize,
    log,
)
from dreambooth.trainer.families.sd import lora_parts, tokenize

#: diffusers' SD3 training scripts' default T5 prompt length
DEFAULT_T5_LENGTH = 77


class T5Part(torch.nn.Module):
    """T5's part of the prompt: its last hidden states for ``max_length`` tokens, or zeros
    of ``width`` when there is no T5 (``encoder`` None)."""

    def __init__(self, encoder: torch.nn.Module | None, width: int, max_length: int = DEFAULT_T5_LENGTH) -> None:
        super().__init__()
        self.encoder, self.width, self.max_length = encoder, width, max_length

    def forward(self, tokenizer, prompts: list[str], device) -> torch.Tensor:
        if self.encoder is None:
            return torch.zeros(len(prompts), self.max_length, self.width, device=device)
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return self.encoder(ids)[0]


class StableDiffusion3(Family):
    name = "sd3"
    title = "Stable Diffusion 3"
    pipelines = frozenset({"StableDiffusion3Pipeline"})
    #: text_encoder_3 and tokenizer_3 are checked by :meth:`configure`: ``t5: drop`` needs neither
    required_files = (
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    )
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trainable_text_encoders = 2  # the CLIP encoders; T5 stays frozen
    vae_in_fp32 = True  # diffusers' SD3 scripts encode in float32 too

    def load(self, path: Path, source: str) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        has_t5 = (path / "text_encoder_3" / "config.json").is_file() and (path / "tokenizer_3").is_dir()
        try:
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3") if has_t5 else None
            components = Components(
                family=self,
                path=path,
                tokenizers=[
                    CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                    CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                    T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3") if has_t5 else None,
                ],
                text_encoders=[
                    CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
                    CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                    T5Part(t5, transformer.config.joint_attention_dim),
                ],
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                denoiser=transformer,
                noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            )
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{source} could not be loaded ({err}); {self.layout_hint()}") from None
        self._check_widths(components, source)
        log.info("loaded %s (%s, flow matching%s)", source, self.title, "" if has_t5 else ", no T5")
        return components

    def _check_widths(self, components: Components, source: str) -> None:
        config = components.denoiser.config
        clip = components.text_encoders[:2]
        pooled = sum(te.config.projection_dim for te in clip)
        hidden = sum(te.config.hidden_size for te in clip)
        t5 = components.text_encoders[2].encoder
        problems = []
        if config.pooled_projection_dim != pooled:
            problems.append(f"pooled_projection_dim {config.pooled_projection_dim}, the CLIP projections give {pooled}")
        if hidden > config.joint_attention_dim:
            problems.append(
                f"joint_attention_dim {config.joint_attention_dim} is narrower than the CLIP states ({hidden})"
            )
        if t5 is not None and t5.config.d_model != config.joint_attention_dim:
            problems.append(f"joint_attention_dim {config.joint_attention_dim}, T5 gives {t5.config.d_model}")
        if problems:
            raise ModelError(
                f"{source}/transformer does not fit these text encoders ({'; '.join(problems)}); {self.layout_hint()}"
            )

    def configure(self, components: Components, training: TrainingSpec, source: str) -> None:
        t5 = components.text_encoders[2]
        if training.t5 is T5Mode.DROP:
            t5.encoder = None  # freed: the prompt's T5 part is zeros
            components.tokenizers[2] = None
            return
        if t5.encoder is None:
            raise ModelError(
                f"{source} has no T5 text encoder (text_encoder_3/ and tokenizer_3/) and training.t5 "
                "is keep: add them to the folder, or set training.t5: drop"
            )
        t5.max_length = training.max_sequence_length or DEFAULT_T5_LENGTH

    def resolution_multiple(self, components: Components) -> int:
        vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        return vae_factor * components.denoiser.config.patch_size

    def encode(
        self, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], prompts: list[str], device
    ) -> Conditioning:
        hidden, pooled = [], []
        for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2], strict=True):
            out = text_encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as the pipeline reads it
            pooled.append(out[0])  # text_embeds: the projection
        t5 = text_encoders[2](tokenizers[2], prompts, device)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def noised(self, scheduler, latents, noise, gens, training: TrainingSpec) -> Noised:
        return noising.flow_matching(scheduler, latents, noise, gens, training)

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, sizes: Sequence[SampleSize]) -> torch.Tensor:
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
        ).sample

    def sampling_options(self, training: TrainingSpec) -> dict[str, Any]:
        return {"max_sequence_length": training.max_sequence_length or DEFAULT_T5_LENGTH}

    def pipeline(self, *, vae, text_encoders, tokenizers, denoiser, scheduler) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=text_encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=text_encoders[2].encoder,
            tokenizer_3=tokenizers[2] if text_encoders[2].encoder else None,
        )

    def save_single_file(self, pipeline, path: Path) -> None:
        raise NotImplementedError("the SD3 single-file layout")  # refused by the API before a run

    def save_lora(self, pipeline, folder: Path) -> Path:
        type(pipeline).save_lora_weights(
            folder,
            **lora_parts(
                peft_names=True,
                transformer=pipeline.transformer,
                text_encoder=pipeline.text_encoder,
                text_encoder_2=pipeline.text_encoder_2,
            ),
            safe_serialization=True,
        )
        return folder / "pytorch_lora_weights.safetensors"

    def save_lora_kohya(self, pipeline, path: Path) -> None:
        from dreambooth.trainer import kohya

        # ComfyUI (comfy/lora.py) names SD3's transformer modules lora_transformer_<diffusers
        # path> (OneTrainer's naming) and its CLIP-L/CLIP-G modules lora_te1_/lora_te2_ as for
        # SDXL; T5 never trains, so it has no adapters
        kohya.save_kohya_lora(
            pipeline,
            path,
            [
                kohya.Part("lora_transformer", pipeline.transformer),
                kohya.Part("lora_te1", pipeline.text_encoder, kohya.text_model_path),
                kohya.Part("lora_te2", pipeline.text_encoder_2, kohya.text_model_path),
            ],
            base_model=kohya.SD3,
        )
