"""LoRA adapters in the kohya/WebUI format: one ``.safetensors`` that AUTOMATIC1111, Forge,
ComfyUI and diffusers' ``load_lora_weights`` read (kohya-ss/sd-scripts writes it); for SD3,
the same layout with the names ComfyUI reads (``lora_transformer_*``, see the sd3 family).

Each adapted module is one name: a prefix for its part (``lora_unet``; ``lora_te`` for SD
1.x/2.x's text encoder, ``lora_te1``/``lora_te2`` for SDXL's) and the module's path in the
model kohya's scripts build, dots as underscores::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             scalar

The update is ``up @ down * alpha / rank``; peft's is ``B @ A * scaling``, so ``alpha`` is
``scaling x rank`` (whatever the LoRA config: rank and alpha patterns, rsLoRA). Module paths:
the SD UNet keeps diffusers' names (kohya's SD UNet uses them); the SDXL UNet takes the
original ``input_blocks``/``middle_block``/``output_blocks`` names (kohya's SDXL UNet is the
original), which the family supplies; text encoders are the transformers CLIP model, always
below ``text_model``. The header carries kohya's ``ss_`` metadata that WebUI reads to tell
SD 1.x, 2.x and SDXL LoRAs apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth.trainer.errors import ModelError
from dreambooth.trainer.single_file import Rules, rename, write

#: the base model a LoRA is for, as kohya's ``ss_base_model_version`` names it
SD_V1, SD_V2, SDXL, SD3 = "sd_v1", "sd_v2", "sdxl_base_v1-0", "sd3"


class KohyaExportError(ModelError, ValueError):
    """The adapters cannot be written in the kohya format."""


def same_path(path: str) -> str:
    return path


def text_model_path(path: str) -> str:
    """A CLIP text encoder's module path as kohya names it: below ``text_model`` (transformers
    5.6+ dropped that level from ``CLIPTextModel``)."""
    return "text_model." + path.removeprefix("text_model.")


def ldm_path(rules: Rules) -> Callable[[str], str]:
    """A UNet module path in the original layout, by the single file's table ``rules``."""

    def renamed(path: str) -> str:
        found = rename(rules, f"{path}.weight")
        if found is None:
            raise KohyaExportError(f"cannot name the UNet module {path!r} in the original layout")
        return found.removesuffix(".weight")

    return renamed


@dataclass(frozen=True)
class Part:
    """One adapted part of the model: its kohya prefix, the module, its path naming."""

    prefix: str
    module: torch.nn.Module | None
    path: Callable[[str], str] = field(default=same_path)


def adapters(part: Part) -> dict[str, torch.Tensor]:
    """The peft LoRA adapters of ``part.module`` as kohya keys (none: an empty dict)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for path, layer in part.module.named_modules() if part.module is not None else ():
        if not isinstance(layer, LoraLayer) or not layer.lora_A:
            continue
        names = list(layer.lora_A)
        if len(names) != 1 or layer.use_dora.get(names[0]):
            raise KohyaExportError(
                f"{part.prefix} module {path!r} has adapters {names} (DoRA: "
                f"{bool(layer.use_dora.get(names[0]))}); one plain LoRA adapter is expected"
            )
        down, up = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight
        key = f"{part.prefix}_{part.path(path).replace('.', '_')}"
        if f"{key}.alpha" in out:
            raise KohyaExportError(f"two {part.prefix} modules are named {key!r}")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(layer.scaling[names[0]] * down.shape[0], dtype=down.dtype)
    return out


def save_kohya_lora(pipeline: Any, path: Path, parts: Sequence[Part], *, base_model: str) -> Path:
    """Write the adapters of ``parts`` as one kohya-format ``.safetensors`` file, atomically."""
    tensors = {key: tensor for part in parts for key, tensor in adapters(part).items()}
    if not tensors:
        raise KohyaExportError("the model has no LoRA adapters to export (lora-kohya needs training.method: lora)")
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": base_model,
        "ss_v2": str(base_model == SD_V2),
        "ss_network_dim": ",".join(map(str, ranks)),
        "ss_network_alpha": ",".join(f"{a:g}" for a in alphas),
    }
    return write(tensors, path, pipeline, {"layout": "kohya-lora"}, metadata=metadata)
