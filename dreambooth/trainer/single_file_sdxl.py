"""Export a Stable Diffusion XL model to one ``.safetensors`` file in Stability's original
layout (``generative-models``/SGM, what the SDXL base checkpoint uses), which AUTOMATIC1111,
ComfyUI and ``StableDiffusionXLPipeline.from_single_file`` read.

The keys, by prefix:

``model.diffusion_model.``              the UNet, numbered as LDM's (``input_blocks``,
                                        ``middle_block``, ``output_blocks``), with the
                                        ``text_time`` embedding as ``label_emb.0``
``first_stage_model.``                  the VAE, as in SD 1.x
``conditioner.embedders.0.transformer.`` the first text encoder (OpenAI CLIP ViT-L), in the
                                        transformers ``CLIPTextModel`` layout
``conditioner.embedders.1.model.``      the second (OpenCLIP ViT-bigG) in OpenCLIP's layout:
                                        ``transformer.resblocks.N`` with a fused ``attn.in_proj``,
                                        ``ln_final`` and the projection as ``text_projection``
                                        (transposed: OpenCLIP multiplies ``x @ text_projection``)

The component maps are SD's (:mod:`dreambooth.trainer.single_file`) with these prefixes, so
a key neither layout knows is refused by name here too.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from dreambooth.trainer.single_file import StateDict, clip, openclip, parts, unet, vae, write

TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
#: SDXL's added (pooled text + time ids) embedding: LDM's ``label_emb`` Sequential
TEXT_TIME = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def to_sdxl_state_dict(
    unet_sd: StateDict, vae_sd: StateDict, text_encoder_sd: StateDict, text_encoder_2_sd: StateDict
) -> dict[str, torch.Tensor]:
    """Merge the diffusers/transformers state dicts of an SDXL pipeline into one SGM-layout
    state dict; raises :class:`~dreambooth.trainer.single_file.SingleFileExportError` naming
    any key it cannot place."""
    return {
        **unet(unet_sd, TEXT_TIME),
        **vae(vae_sd),
        **clip(text_encoder_sd, TEXT_ENCODER_1_PREFIX, "text encoder"),
        **openclip(text_encoder_2_sd, TEXT_ENCODER_2_PREFIX, "text encoder 2"),
    }


def save_sdxl_single_file(
    model: Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> pathlib.Path:
    """Write ``model`` (a ``StableDiffusionXLPipeline``, or a mapping of its parts) to ``path``
    as one SGM-layout ``.safetensors`` file, atomically; return the path."""
    tensors = to_sdxl_state_dict(*parts(model, PARTS))
    return write(
        tensors, path, model, {"layout": "sgm", "text_encoder": "clip+openclip"}, dtype=dtype, metadata=metadata
    )
