"""What trains: the whole UNet (and text encoder), or LoRA adapters on them.

Frozen parts live on the device in the mixed-precision dtype; everything the optimizer
updates stays in float32. Only the parameters the optimizer updates go into checkpoints
(:mod:`dreambooth.trainer.state`), so a LoRA checkpoint holds only the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreambooth.api.spec import DreamBoothJobSpec, Method

#: CLIP text-encoder attention projections that get LoRA adapters
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Trainables:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    groups: list[dict]  # optimizer parameter groups
    text_encoder_steps: int  # the text encoder (or its adapters) trains while step < this

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The modules whose gradients must be synchronised between processes."""
        return [self.unet, self.text_encoder] if self.text_encoder_steps else [self.unet]


def _lora_config(spec: DreamBoothJobSpec, targets: list[str]):
    from peft import LoraConfig

    lora = spec.training.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=targets, init_lora_weights="gaussian")


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters train in float32 even when the base is fp16/bf16
    return params


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    module.to(device)
    if dtype != torch.float32:  # .to(float32) makes diffusers warn about nothing
        module.to(dtype=dtype)
    return module


def select(spec: DreamBoothJobSpec, unet, text_encoder, *, device, dtype) -> Trainables:
    """Freeze, adapt and place the models for ``spec``'s method; returns what trains."""
    t = spec.training
    te_lr = t.text_encoder_learning_rate or t.learning_rate
    if t.method is Method.LORA:
        place(unet.requires_grad_(False), device, dtype)
        unet.add_adapter(_lora_config(spec, t.lora.target_modules))
        place(text_encoder.requires_grad_(False), device, dtype)
        te_steps = t.steps if t.lora.text_encoder else 0
        if te_steps:
            # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
            from peft import inject_adapter_in_model

            inject_adapter_in_model(_lora_config(spec, TEXT_ENCODER_LORA_TARGETS), text_encoder)
        groups = [{"params": _trainable(unet), "lr": t.learning_rate}]
    else:
        place(unet.requires_grad_(True), device, torch.float32)
        te_steps = (t.text_encoder_steps or t.steps) if t.train_text_encoder else 0
        place(text_encoder.requires_grad_(te_steps > 0), device, torch.float32 if te_steps else dtype)
        groups = [{"params": list(unet.parameters()), "lr": t.learning_rate}]
    if te_steps:
        groups.append({"params": _trainable(text_encoder), "lr": te_lr})
    unet.train()
    text_encoder.train(te_steps > 0)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_steps:
            text_encoder.gradient_checkpointing_enable()
    return Trainables(unet, text_encoder, groups, te_steps)
