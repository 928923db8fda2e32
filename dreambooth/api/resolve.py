"""Pure resolution of a spec into its effective values: preset first, explicit fields win.

:func:`effective_spec` returns a spec in which every preset-controlled or derived field is
filled in, so that the trainer never has to know about presets.
"""

from __future__ import annotations

from typing import Any

from dreambooth.api.presets import preset_value
from dreambooth.api.spec import (
    DreamBoothJobSpec,
    LoraSpec,
    Method,
    OutputFormat,
)

#: checkpointing.everySteps when nothing else is said (capped at training.steps)
DEFAULT_CHECKPOINT_EVERY = 100


def _fill(section: Any, section_name: str, preset: Any) -> dict[str, Any]:
    """Values the preset (or BASE) gives to the fields of ``section`` left unset (None)."""
    updates: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        if getattr(section, name) is None:
            value = preset_value(preset, section_name, field.alias or name)
            if value is not None:
                updates[name] = value
    return updates


def effective_spec(spec: DreamBoothJobSpec) -> DreamBoothJobSpec:
    """``spec`` with preset values and derived defaults filled in. Pure; does not validate."""
    t_fill = _fill(spec.training, "training", spec.preset)
    if spec.training.method is Method.LORA and "train_text_encoder" in t_fill:
        # A preset's trainTextEncoder means full fine-tuning of the text encoder; a LoRA run
        # trains text-encoder adapters only when training.lora.textEncoder says so.
        t_fill["train_text_encoder"] = False
    training = spec.training.model_copy(update=t_fill)
    prior = spec.prior.model_copy(update=_fill(spec.prior, "prior", spec.preset))

    t_updates: dict[str, Any] = {}
    if training.text_encoder_learning_rate is None and training.train_text_encoder:
        t_updates["text_encoder_learning_rate"] = training.learning_rate
    if training.method is Method.LORA:
        lora = training.lora or LoraSpec()
        if lora.alpha is None:
            lora = lora.model_copy(update={"alpha": float(lora.rank)})
        t_updates["lora"] = lora
    training = training.model_copy(update=t_updates)

    checkpointing = spec.checkpointing
    if checkpointing.every_steps is None:
        every = min(DEFAULT_CHECKPOINT_EVERY, training.steps or DEFAULT_CHECKPOINT_EVERY)
        checkpointing = checkpointing.model_copy(update={"every_steps": every})

    validation = spec.validation
    v_updates: dict[str, Any] = {}
    if not validation.prompts:
        v_updates["prompts"] = [spec.instance.prompt]
    if validation.every_steps is None:
        v_updates["every_steps"] = checkpointing.every_steps
    validation = validation.model_copy(update=v_updates)

    output = spec.output
    if output.formats is None:
        formats = (
            [OutputFormat.LORA]
            if training.method is Method.LORA
            else [OutputFormat.DIFFUSERS, OutputFormat.SAFETENSORS]
        )
        output = output.model_copy(update={"formats": formats})

    return spec.model_copy(
        update={
            "training": training,
            "prior": prior,
            "checkpointing": checkpointing,
            "validation": validation,
            "output": output,
        }
    )


def images_per_step(batch_size: int, prior_preservation: bool) -> int:
    """Images one optimizer step processes: ``batchSize`` photos, and as many class images
    with prior preservation (the trainer's images/s counts both; the ETA divides by it)."""
    return batch_size * (2 if prior_preservation else 1)


def total_steps(spec: DreamBoothJobSpec) -> int:
    """Optimizer steps of the whole run: textual inversion (if any), then DreamBooth."""
    ti = spec.training.textual_inversion
    return (ti.steps if ti else 0) + (spec.training.steps or 0)
