"""What trains: the whole denoiser (and the text encoders), or LoRA adapters on them.

Frozen parts live on the device in the mixed-precision dtype; everything the optimizer
updates stays in float32. A part the export writes whole (full fine-tuning: the VAE, a
frozen text encoder; the UNet that textual inversion's phase 1 only reads) is never cast
in place: the device gets a cast copy and the float32 original is what gets exported or
trained later, so half precision never rounds a base weight. Only the parameters the
optimizer updates go into checkpoints (:mod:`dreambooth.trainer.state`), so a LoRA
checkpoint holds only the adapters.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dreambooth.api.spec import DreamBoothJobSpec, Method

#: CLIP text-encoder attention projections that get LoRA adapters
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Trainables:
    denoiser: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # those read in training (cast copies when frozen)
    groups: list[dict]  # optimizer parameter groups
    text_encoder_steps: int  # the text encoders (or their adapters) train while step < this
    fixed: list[torch.nn.Module] = field(default_factory=list)  # text encoders that never train (SD3's T5)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The modules whose gradients must be synchronised between processes."""
        return [self.denoiser, *self.text_encoders] if self.text_encoder_steps else [self.denoiser]


def _lora_config(spec: DreamBoothJobSpec, targets: list[str]):
    from peft import LoraConfig

    lora = spec.training.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
    )


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters train in float32 even when the base is fp16/bf16
    return params


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast ``module`` itself (its weights are rounded to ``dtype``)."""
    module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)  # only when needed: diffusers warns on every cast
    return module


def cast_copy(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` on ``device`` with its floating-point tensors in ``dtype``;
    ``module`` is untouched. Each tensor is cast as it is copied, so the copy never exists
    in float32 (peak memory: the original plus the small copy)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in memo:
            continue
        cast = tensor.detach().to(device, dtype if tensor.is_floating_point() else tensor.dtype)
        memo[id(tensor)] = (
            torch.nn.Parameter(cast, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cast
        )
    return copy.deepcopy(module, memo)


def frozen(module: torch.nn.Module, device, dtype: torch.dtype, *, keep_original: bool) -> torch.nn.Module:
    """``module`` frozen on ``device`` in ``dtype``: a cast copy when the float32 original
    must stay exact (``keep_original``), else the module itself, cast in place."""
    module.requires_grad_(False).eval()
    if keep_original and dtype != torch.float32:
        return cast_copy(module, device, dtype)
    return place(module, device, dtype)


def keeps_originals(spec: DreamBoothJobSpec) -> bool:
    """Full fine-tuning exports (or later trains) every part whole; LoRA exports adapters."""
    return spec.training.method is Method.FULL


def select(
    spec: DreamBoothJobSpec,
    denoiser,
    text_encoders: list,
    *,
    device,
    dtype,
    trainable: int | None = None,
    unread: Callable[[list], list[torch.nn.Parameter]] = lambda encoders: [],
) -> Trainables:
    """Freeze, adapt and place the models for ``spec``'s method; returns what trains. The
    text encoders train together (SDXL's two alike) or not at all; only the first
    ``trainable`` of them may (None: all), the others are frozen whatever the method;
    ``unread(encoders)`` (the family's) names their parameters the conditioning never
    reads, which stay frozen too."""
    t = spec.training
    fixed = (
        [frozen(te, device, dtype, keep_original=keeps_originals(spec)) for te in text_encoders[trainable:]]
        if trainable is not None
        else []
    )
    text_encoders = text_encoders[:trainable]
    te_lr = t.text_encoder_learning_rate or t.learning_rate
    if t.method is Method.LORA:
        place(denoiser.requires_grad_(False), device, dtype)
        denoiser.add_adapter(_lora_config(spec, t.lora.target_modules))
        te_steps = t.steps if t.lora.text_encoder else 0
        for text_encoder in text_encoders:
            place(text_encoder.requires_grad_(False), device, dtype)
            if te_steps:
                # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
                from peft import inject_adapter_in_model

                inject_adapter_in_model(_lora_config(spec, TEXT_ENCODER_LORA_TARGETS), text_encoder)
        groups = [{"params": _trainable(denoiser), "lr": t.learning_rate}]
    else:
        place(denoiser.requires_grad_(True), device, torch.float32)
        te_steps = (t.text_encoder_steps or t.steps) if t.train_text_encoder else 0
        if te_steps:
            for text_encoder in text_encoders:
                place(text_encoder.requires_grad_(True), device, torch.float32)
        else:
            text_encoders = [frozen(te, device, dtype, keep_original=True) for te in text_encoders]
        groups = [{"params": list(denoiser.parameters()), "lr": t.learning_rate}]
    if te_steps:
        for p in unread(text_encoders):
            p.requires_grad_(False)
        groups.append({"params": [p for te in text_encoders for p in _trainable(te)], "lr": te_lr})
    denoiser.train()
    for text_encoder in text_encoders:
        text_encoder.train(te_steps > 0)
    if t.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if te_steps:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()
    return Trainables(denoiser, list(text_encoders), groups, te_steps, fixed)
