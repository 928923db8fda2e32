"""Rules on the training settings of the effective spec (preset applied): what a method
takes, cadences within the steps, the batch over the processes, formats, buckets."""

from __future__ import annotations

from dreambooth.api.redact import shown
from dreambooth.api.rules.violation import Violation
from dreambooth.api.spec import (
    LORA_FORMATS,
    Method,
    MixedPrecision,
    T5Mode,
)


def text_encoder_settings(spec, eff):
    t = eff.training
    if spec.training.text_encoder_steps is not None:
        if not t.train_text_encoder:
            yield Violation(
                "training.textEncoderSteps",
                "only applies when training.trainTextEncoder is true",
            )
        elif t.text_encoder_steps > t.steps:
            yield Violation(
                "training.textEncoderSteps",
                f"must be at most training.steps ({t.steps}), got {t.text_encoder_steps}",
            )
    if spec.training.text_encoder_learning_rate is not None and not t.train_text_encoder:
        yield Violation(
            "training.textEncoderLearningRate",
            "only applies when training.trainTextEncoder is true",
        )


def lora_settings(spec, eff):
    t = eff.training
    if spec.training.lora is not None and t.method is not Method.LORA:
        yield Violation("training.lora", "LoRA settings need training.method: lora")
    if t.method is Method.LORA:
        if spec.training.train_text_encoder:
            yield Violation(
                "training.trainTextEncoder",
                "with method lora, train text-encoder adapters with training.lora.textEncoder: true instead",
            )
        if t.ema:
            yield Violation("training.ema", "EMA is only supported with training.method: full")
        if t.textual_inversion is not None:
            yield Violation(
                "training.textualInversion",
                "textual inversion + DreamBooth needs training.method: full",
            )


def steps_bounds(spec, eff):
    steps = eff.training.steps
    checks = [("checkpointing.everySteps", spec.checkpointing.every_steps)]
    if spec.validation.enabled:  # a disabled validation's cadence does not matter
        checks.insert(0, ("validation.everySteps", spec.validation.every_steps))
    for path, value in checks:
        if value is not None and value > steps:
            yield Violation(path, f"must be at most training.steps ({steps}), got {value}")
    if eff.training.lr_warmup_steps >= steps and eff.training.lr_warmup_steps > 0:
        yield Violation(
            "training.lrWarmupSteps",
            f"must be less than training.steps ({steps}), got {eff.training.lr_warmup_steps}",
        )


def batch_divides(spec, eff):
    processes = eff.resources.num_processes
    accumulation = eff.training.gradient_accumulation_steps
    per_step = processes * accumulation
    if eff.training.batch_size % per_step:
        bigger = -(-eff.training.batch_size // per_step) * per_step
        yield Violation(
            "training.batchSize",
            f"{eff.training.batch_size} images cannot be split evenly over {processes} "
            f"process(es) (resources.nodes x gpusPerNode) x {accumulation} accumulation step(s): "
            f"use a multiple of {per_step}, e.g. {bigger}",
        )


def precision_needs_gpu(spec, eff):
    if eff.training.mixed_precision is MixedPrecision.FP16 and eff.resources.gpus_per_node == 0:
        yield Violation(
            "training.mixedPrecision",
            "fp16 needs GPUs (resources.gpusPerNode >= 1): use no or bf16 on CPUs",
        )


def output_formats(spec, eff):
    formats = eff.output.formats or []
    if len(set(formats)) != len(formats):
        yield Violation("output.formats", "lists a format twice")
    if eff.training.method is Method.LORA:
        full = [f.value for f in formats if f not in LORA_FORMATS]
        if full:
            yield Violation(
                "output.formats",
                f"{', '.join(full)} need training.method: full; a LoRA run exports "
                f"{' and/or '.join(sorted(LORA_FORMATS))}",
            )
    else:
        adapters = [f.value for f in formats if f in LORA_FORMATS]
        if adapters:
            yield Violation(
                "output.formats",
                f"{', '.join(adapters)} {'needs' if len(adapters) == 1 else 'need'} training.method: "
                f"lora (a {eff.training.method.value} fine-tune has no adapters to export)",
            )


def bucket_settings(spec, eff):
    b, resolution, where = eff.training.buckets, eff.training.resolution, "training.buckets"
    if b is None or not b.enabled:
        for name, side in (("minSide", b and b.min_side), ("maxSide", b and b.max_side)):
            if side is not None:
                yield Violation(
                    f"{where}.{name}",
                    "only applies when training.buckets.enabled is true (off by default for Stable Diffusion 1.x/2.x)",
                )
        return
    for name, side in (("minSide", b.min_side), ("maxSide", b.max_side)):
        if side % b.step:
            yield Violation(
                f"{where}.{name}",
                f"must be a multiple of training.buckets.step ({b.step}), got "
                f"{side}: e.g. {max(b.step, side // b.step * b.step)}",
            )
    if b.min_side > b.max_side:
        yield Violation(
            f"{where}.minSide", f"must be at most training.buckets.maxSide ({b.max_side}), got {b.min_side}"
        )
    if resolution % b.step:
        yield Violation(
            f"{where}.step",
            f"must divide training.resolution ({resolution}), the side of the square bucket; got {b.step}",
        )
    elif b.max_side < resolution:
        yield Violation(
            f"{where}.maxSide",
            f"must be at least training.resolution ({resolution}): buckets "
            f"hold about {resolution}x{resolution} pixels; got {b.max_side}",
        )
    elif b.min_side > resolution:
        yield Violation(f"{where}.minSide", f"must be at most training.resolution ({resolution}), got {b.min_side}")


def textual_inversion_token(spec, eff):
    ti = eff.training.textual_inversion
    if ti is None:
        return
    if ti.placeholder_token == ti.initializer_token:
        yield Violation(
            "training.textualInversion.placeholderToken",
            "is the same as initializerToken: the placeholder is a new token (e.g. '<zwx>'), "
            "the initializer an existing word it starts from (e.g. 'cat')",
        )
    elif f" {ti.placeholder_token} " not in f" {eff.instance.prompt} ":  # words split by spaces
        yield Violation(
            "training.textualInversion.placeholderToken",
            f"{shown(ti.placeholder_token)} must appear as a word in instance.prompt ({shown(eff.instance.prompt)})",
        )


def t5_length_needs_t5(spec, eff):
    if spec.training.max_sequence_length is not None and eff.training.t5 is T5Mode.DROP:
        yield Violation(
            "training.maxSequenceLength",
            "is the prompt length T5 reads, and training.t5 is drop: remove maxSequenceLength, or keep T5",
        )
