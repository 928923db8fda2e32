"""Pure resolution of a spec into its effective values: preset first, explicit fields win.

:func:`effective_spec` returns a spec in which every preset-controlled or derived field is
filled in, so that the trainer never has to know about presets.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.alias_generators import to_snake

from dreambooth.api.families import FACTS
from dreambooth.api.presets import ModelFamily, preset_value
from dreambooth.api.spec import (
    BucketsSpec,
    DreamBoothJobSpec,
    LoraSpec,
    Method,
    OutputFormat,
    T5Mode,
)

#: checkpointing.everySteps when nothing else is said (capped at training.steps)
DEFAULT_CHECKPOINT_EVERY = 100


def _fill(section: Any, section_name: str, preset: Any, family: ModelFamily) -> dict[str, Any]:
    """Values the preset (or BASE) gives to the fields of ``section`` left unset (None)."""
    updates: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        current = getattr(section, name)
        if current is None or isinstance(current, BaseModel):
            value = preset_value(preset, section_name, field.alias or name, family)
            if value is None:
                continue
            if current is None:  # presets hold wire values: "lora" becomes Method.LORA
                updates[name] = _adapter(field.annotation).validate_python(value)
            elif isinstance(value, dict):  # a nested section (training.buckets): its unset fields
                unset = {k: v for k, v in value.items() if getattr(current, to_snake(k)) is None}
                if unset:
                    updates[name] = type(current).model_validate({**current.wire(), **unset})
    return updates


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def family_of(spec: DreamBoothJobSpec, detected: ModelFamily | None = None) -> ModelFamily:
    """The family whose defaults apply: the one the job names, else the one the trainer found
    in the model, else SD 1.x/2.x (what the operator assumes before the trainer has looked)."""
    if spec.base_model.family is not ModelFamily.AUTO:
        return spec.base_model.family
    return detected or ModelFamily.SD


def effective_spec(spec: DreamBoothJobSpec, detected: ModelFamily | None = None) -> DreamBoothJobSpec:
    """``spec`` with the family's preset values and derived defaults filled in (``detected``:
    the family the trainer found for a job with ``baseModel.family: auto``). Pure; does not
    validate."""
    family = family_of(spec, detected)
    t_fill = _fill(spec.training, "training", spec.preset, family)
    method = t_fill.get("method", spec.training.method)
    if method is Method.LORA and "train_text_encoder" in t_fill:
        # A preset's trainTextEncoder means full fine-tuning of the text encoder; a LoRA run
        # trains text-encoder adapters only when training.lora.textEncoder says so.
        t_fill["train_text_encoder"] = False
    training = spec.training.model_copy(update=t_fill)
    prior = spec.prior.model_copy(update=_fill(spec.prior, "prior", spec.preset, family))
    if not prior.enabled:  # a disabled feature gets no settings (dreambooth.api.rules refuses them)
        prior = prior.model_copy(update={"class_prompt": spec.prior.class_prompt, "num_images": spec.prior.num_images})

    t_updates: dict[str, Any] = {}
    if training.t5 is T5Mode.DROP and spec.training.max_sequence_length is None:
        # no T5, no prompt length for it to read (dreambooth.api.rules refuses one given)
        t_updates["max_sequence_length"] = None
    if training.text_encoder_learning_rate is None and training.train_text_encoder:
        t_updates["text_encoder_learning_rate"] = training.learning_rate
    if training.method is Method.LORA:
        lora = training.lora or LoraSpec()
        if lora.alpha is None:
            lora = lora.model_copy(update={"alpha": float(lora.rank)})
        if lora.target_modules is None:
            lora = lora.model_copy(update={"target_modules": list(FACTS[family].lora_targets)})
        t_updates["lora"] = lora
    if training.buckets is not None and training.buckets.enabled and training.resolution:
        t_updates["buckets"] = bucket_bounds(training.buckets, training.resolution)
    training = training.model_copy(update=t_updates)

    checkpointing = spec.checkpointing
    if checkpointing.every_steps is None:
        every = min(DEFAULT_CHECKPOINT_EVERY, training.steps or DEFAULT_CHECKPOINT_EVERY)
        checkpointing = checkpointing.model_copy(update={"every_steps": every})

    validation = spec.validation
    v_updates: dict[str, Any] = _fill(validation, "validation", spec.preset, family)
    if not validation.enabled:  # only the scheduler matters: the exported pipeline's
        v_updates = {"scheduler": v_updates["scheduler"]} if "scheduler" in v_updates else {}
    else:
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


def bucket_bounds(buckets: BucketsSpec, resolution: int) -> BucketsSpec:
    """``buckets`` with its sides filled in: from half to twice ``resolution``, on the step."""
    step = buckets.step
    low = buckets.min_side if buckets.min_side is not None else max(step, -(-resolution // 2 // step) * step)
    high = buckets.max_side if buckets.max_side is not None else max(low, 2 * resolution // step * step)
    return buckets.model_copy(update={"min_side": low, "max_side": high})


def images_per_step(batch_size: int, prior_preservation: bool) -> int:
    """Images one optimizer step processes: ``batchSize`` photos, and as many class images
    with prior preservation (the trainer's images/s counts both; the ETA divides by it)."""
    return batch_size * (2 if prior_preservation else 1)


def total_steps(spec: DreamBoothJobSpec) -> int:
    """Optimizer steps of the whole run: textual inversion (if any), then DreamBooth."""
    ti = spec.training.textual_inversion
    return (ti.steps if ti else 0) + (spec.training.steps or 0)
