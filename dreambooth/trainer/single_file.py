"""Export a Stable Diffusion 1.x/2.x model to one ``.safetensors`` file in the original layout.

AUTOMATIC1111, ComfyUI and ``StableDiffusionPipeline.from_single_file`` read one file with
the CompVis/LDM key layout: the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the text encoder under ``cond_stage_model.transformer.`` (SD 1.x,
OpenAI CLIP in the transformers layout) or ``cond_stage_model.model.`` (SD 2.x, OpenCLIP).

The mapping is table driven: each component's diffusers *module paths* (``down_blocks.0.
resnets.1``) map to LDM module paths (``input_blocks.2.0``), with a table of renamed leaves
per kind of module (a resnet's ``norm1`` is ``in_layers.0``). The block tables are derived
from the keys present, so any number of blocks and layers per block works. A key that no
table covers (a LoRA adapter, an SDXL part, a typo) raises :class:`SingleFileExportError`
naming it: a checkpoint that silently lacks weights is worse than none. The component maps
take their prefix, so SDXL's layout (:mod:`dreambooth.trainer.single_file_sdxl`) reuses them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import torch

from dreambooth.trainer.errors import ModelError

TextEncoderLayout = Literal["clip", "openclip"]
StateDict = Mapping[str, torch.Tensor]
#: A diffusers module path -> (its LDM path, leaf renames or None to keep every leaf).
Rules = dict[str, tuple[str, Mapping[str, str] | None]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

_PARAMS = {"weight": "weight", "bias": "bias"}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    **{
        name: name
        for name in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    },
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",  # and the names diffusers used before 0.15:
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_OPENCLIP_FIXED: Rules = {
    "embeddings.token_embedding": ("token_embedding", _PARAMS),
    "embeddings.position_embedding": ("", {"weight": "positional_embedding"}),
    "final_layer_norm": ("ln_final", _PARAMS),
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.in_proj": "attn",
}  # q, k, v stacked by openclip()
_IN_PROJ = {"weight": "in_proj_weight", "bias": "in_proj_bias"}
_ADAPTER_PARTS = {"base_layer", "lora_A", "lora_B", "lora_down", "lora_up", "lora_magnitude_vector"}


class SingleFileExportError(ModelError, ValueError):
    """The weights cannot be written in the original Stable Diffusion layout."""


def _longest(table: Mapping[str, Any], key: str) -> tuple[str, str] | None:
    """Split ``key`` into its longest dotted prefix that is in ``table``, and the rest."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if (head := ".".join(parts[:cut])) in table:
            return head, ".".join(parts[cut:])
    return None


def _leaf(leaves: Mapping[str, str] | None, rest: str) -> str | None:
    """Rename the part of a key below its module by ``leaves`` (None: keep it)."""
    if leaves is None or rest in leaves:
        return rest if leaves is None else leaves[rest]
    found = _longest(leaves, rest)
    return None if found is None else f"{leaves[found[0]]}.{found[1]}"


def rename(rules: Rules, key: str) -> str | None:
    """``key`` (a parameter's diffusers name) in the LDM layout by ``rules``; None: unknown."""
    found = _longest(rules, key)
    leaf = _leaf(rules[found[0]][1], found[1]) if found else None
    return None if leaf is None else ".".join(filter(None, (rules[found[0]][0], leaf)))


def _apply(sd: StateDict, rules: Rules, prefix: str, component: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``sd`` by ``rules`` and prepend ``prefix``; refuse unknown keys."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        adapter = _ADAPTER_PARTS.intersection(key.split("."))
        renamed = None if adapter else rename(rules, key)
        if renamed is None:
            hint = " (merge LoRA/PEFT adapters into the weights first)" if adapter else ""
            raise SingleFileExportError(
                f"cannot map {component} key {key!r} to the original Stable Diffusion layout"
                f"{hint}; supported: the UNet2DConditionModel, AutoencoderKL and CLIP text "
                "encoders of SD 1.x/2.x and SDXL"
            )
        name = prefix + renamed
        if name in out:
            raise SingleFileExportError(f"{component} key {key!r} maps onto {name!r} twice")
        out[name] = tensor
    return out


def _layers(sd: StateDict, pattern: str) -> dict[int, int]:
    """``{block: number of layers}`` from the keys matching ``pattern`` (groups: block, layer)."""
    counts: dict[int, int] = {}
    for key in sd:
        if match := re.match(pattern, key):
            block, layer = int(match[1]), int(match[2])
            counts[block] = max(counts.get(block, 0), layer + 1)
    return counts


def unet_rules(sd: StateDict, extra: Mapping[str, str] | None = None) -> Rules:
    """The UNet's module table. LDM numbers ``input_blocks`` and ``output_blocks`` through all
    levels (a downsampler takes a number of its own), and interleaves the middle block.
    ``extra``: more fixed modules, diffusers path -> LDM path (SDXL's added embedding)."""
    rules: Rules = {k: (v, _PARAMS) for k, v in {**_UNET_FIXED, **(extra or {})}.items()}
    index = 1  # input_blocks.0 is conv_in
    for block, count in sorted(_layers(sd, r"down_blocks\.(\d+)\.resnets\.(\d+)\.").items()):
        down = f"down_blocks.{block}"
        for layer in range(count):
            rules[f"{down}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET)
            rules[f"{down}.attentions.{layer}"] = (f"input_blocks.{index}.1", None)
            index += 1
        if f"{down}.downsamplers.0.conv.weight" in sd:
            rules[f"{down}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _PARAMS)
            index += 1
    mid = re.compile(r"mid_block\.resnets\.(\d+)\.")
    for layer in range(1 + max((int(m[1]) for k in sd if (m := mid.match(k))), default=-1)):
        rules[f"mid_block.resnets.{layer}"] = (f"middle_block.{2 * layer}", _UNET_RESNET)
        rules[f"mid_block.attentions.{layer}"] = (f"middle_block.{2 * layer + 1}", None)
    index = 0
    for block, count in sorted(_layers(sd, r"up_blocks\.(\d+)\.resnets\.(\d+)\.").items()):
        up = f"up_blocks.{block}"
        for layer in range(count):
            rules[f"{up}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET)
            rules[f"{up}.attentions.{layer}"] = (f"output_blocks.{index}.1", None)
            index += 1
        slot = 2 if any(k.startswith(f"{up}.attentions.") for k in sd) else 1  # after attention
        rules[f"{up}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", _PARAMS)
    return rules


def vae_rules(sd: StateDict) -> Rules:
    """The VAE's module table. LDM numbers the decoder's levels in reverse (``up.0`` is the
    last to run) and names the two middle resnets ``block_1``/``block_2``."""
    rules: Rules = {k: (v, _PARAMS) for k, v in _VAE_FIXED.items()}
    for block, count in _layers(sd, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.").items():
        rules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv", _PARAMS)
        for layer in range(count):
            rules[f"encoder.down_blocks.{block}.resnets.{layer}"] = (f"encoder.down.{block}.block.{layer}", _VAE_RESNET)
    up = _layers(sd, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.")
    for block, count in up.items():
        level = len(up) - 1 - block
        rules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", _PARAMS)
        for layer in range(count):
            rules[f"decoder.up_blocks.{block}.resnets.{layer}"] = (f"decoder.up.{level}.block.{layer}", _VAE_RESNET)
    for part in ("encoder", "decoder"):
        rules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
        for layer in range(2):
            rules[f"{part}.mid_block.resnets.{layer}"] = (f"{part}.mid.block_{layer + 1}", _VAE_RESNET)
    return rules


def unet(sd: StateDict, extra: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    return _apply(sd, unet_rules(sd, extra), UNET_PREFIX, "UNet")


def vae(sd: StateDict) -> dict[str, torch.Tensor]:
    out = _apply(sd, vae_rules(sd), VAE_PREFIX, "VAE")
    for key, tensor in out.items():  # LDM's VAE attention projections are 1x1 convolutions
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _text_model(sd: StateDict) -> dict[str, torch.Tensor]:
    """Keys below ``text_model.`` (transformers 5.6+ dropped that level from ``CLIPTextModel``;
    older state dicts have it), less ``position_ids``: a constant ``arange`` buffer."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def clip(sd: StateDict, prefix: str = CLIP_PREFIX, component: str = "text encoder") -> dict[str, torch.Tensor]:
    """SD 1.x (and SDXL's first encoder): the transformers ``CLIPTextModel`` layout (with
    ``text_model.``)."""
    flat = _text_model(sd)
    rules: Rules = {name: (f"text_model.{name}", None) for name in ("embeddings", "encoder", "final_layer_norm")}
    return _apply(flat, rules, prefix, component)


def openclip(sd: StateDict, prefix: str = OPENCLIP_PREFIX, component: str = "text encoder") -> dict[str, torch.Tensor]:
    """SD 2.x (and SDXL's second encoder): OpenCLIP's layout, with q/k/v stacked into one
    ``in_proj`` per layer, and a ``CLIPTextModelWithProjection``'s projection as OpenCLIP's
    ``text_projection`` matrix (``x @ text_projection``: the transpose of a linear weight).

    A diffusers SD 2 text encoder has 23 of OpenCLIP ViT-H's 24 layers: SD 2 reads the
    penultimate layer's output, so readers that build all 24 leave the last one unused.
    """
    flat = _text_model(sd)
    projection = flat.pop("text_projection.weight", None)
    for name in {k.rsplit(".", 2)[0] for k in flat if re.search(r"\.[qkv]_proj\.(weight|bias)$", k)}:
        for param in ("weight", "bias"):
            parts = [flat.pop(f"{name}.{p}_proj.{param}", None) for p in "qkv"]
            if any(part is None for part in parts):
                raise SingleFileExportError(f"text encoder {name} lacks a q, k or v {param}")
            flat[f"{name}.in_proj.{param}"] = torch.cat(parts)
    rules: Rules = dict(_OPENCLIP_FIXED)
    for layer in range(
        1 + max((int(m[1]) for k in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", k))), default=-1)
    ):
        for old, new in _OPENCLIP_LAYER.items():
            leaves = _IN_PROJ if old.endswith("in_proj") else None
            rules[f"encoder.layers.{layer}.{old}"] = (f"transformer.resblocks.{layer}.{new}", leaves)
    out = _apply(flat, rules, prefix, component)
    if projection is not None:
        out[f"{prefix}text_projection"] = projection.T
    return out


def to_original_state_dict(
    unet_sd: StateDict,
    vae_sd: StateDict,
    text_encoder_sd: StateDict,
    *,
    text_encoder_layout: TextEncoderLayout = "clip",
) -> dict[str, torch.Tensor]:
    """Merge diffusers/transformers state dicts into one original-layout state dict.

    ``text_encoder_layout`` is ``"clip"`` for SD 1.x (OpenAI CLIP ViT-L) and ``"openclip"``
    for SD 2.x (OpenCLIP ViT-H, a ``CLIPTextModel`` with ``hidden_act="gelu"``). Tensors are
    shared with the inputs, except the reshaped VAE attention weights and the stacked OpenCLIP
    ``in_proj``. Raises :class:`SingleFileExportError` naming any key it cannot place.
    """
    if text_encoder_layout not in ("clip", "openclip"):
        raise ValueError(f"text_encoder_layout must be 'clip' or 'openclip', not {text_encoder_layout!r}")
    text = clip if text_encoder_layout == "clip" else openclip
    return {**unet(unet_sd), **vae(vae_sd), **text(text_encoder_sd)}


def parts(model: Any, names: tuple[str, ...]) -> list[StateDict]:
    """The state dicts of ``model``'s parts ``names``: ``model`` is a pipeline (or anything
    with those attributes) or a mapping; each part a module or a state dict."""
    get = model.get if isinstance(model, Mapping) else lambda name: getattr(model, name, None)
    out = []
    for name in names:
        component = get(name)
        if component is None:
            raise SingleFileExportError(f"the model has no {name}; a single file needs {', '.join(names)}")
        out.append(component.state_dict() if isinstance(component, torch.nn.Module) else component)
    return out


def save_single_file(
    model: Any,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    text_encoder_layout: TextEncoderLayout | None = None,
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Write ``model`` to ``path`` as one original-layout ``.safetensors`` file; return the path.

    ``model`` is a ``StableDiffusionPipeline`` (or anything with ``unet``, ``vae`` and
    ``text_encoder`` attributes) or a mapping with those keys; each part is a module or a state
    dict. ``dtype`` (e.g. ``torch.float16``) casts the floating-point tensors. The text encoder
    layout defaults to ``"openclip"`` for a module whose config has ``hidden_act="gelu"`` (SD
    2.x), else ``"clip"``. The file is written beside ``path`` and renamed into place.
    """
    unet_sd, vae_sd, text_sd = parts(model, ("unet", "vae", "text_encoder"))
    if text_encoder_layout is None:
        text_encoder = model.get("text_encoder") if isinstance(model, Mapping) else model.text_encoder
        act = getattr(getattr(text_encoder, "config", None), "hidden_act", "quick_gelu")
        text_encoder_layout = "openclip" if act == "gelu" else "clip"
    tensors = to_original_state_dict(unet_sd, vae_sd, text_sd, text_encoder_layout=text_encoder_layout)
    return write(
        tensors, path, model, {"layout": "ldm", "text_encoder": text_encoder_layout}, dtype=dtype, metadata=metadata
    )


def write(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    model: Any,
    info: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Write ``tensors`` (cast to ``dtype``) as one ``.safetensors`` file, atomically; the header
    says ``info`` plus the model's prediction type and the dtype."""
    for key, tensor in tensors.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.detach().to("cpu").contiguous()
    scheduler = model.get("scheduler") if isinstance(model, Mapping) else getattr(model, "scheduler", None)
    config = getattr(scheduler, "config", {})
    info = {
        **info,
        "prediction_type": config.get("prediction_type", "unknown"),
        "dtype": str(dtype or next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    header = {**(metadata or {}), "format": "pt", "dreambooth": json.dumps(info)}

    from safetensors.torch import save_file

    target = pathlib.Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=header)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise
    return target
