"""What a model family cannot take of the effective spec: a named family's rule here, and
the trainer runs the same once it knows the family of an ``auto`` job."""

from __future__ import annotations

from collections.abc import Iterator

from dreambooth.api.families import FACTS
from dreambooth.api.rules.violation import Violation
from dreambooth.api.spec import (
    DreamBoothJobSpec,
    Method,
    ModelFamily,
    Quantization,
)


def family_violations(eff: DreamBoothJobSpec, family: ModelFamily) -> Iterator[Violation]:
    """What ``family`` cannot take of the effective spec ``eff`` (also run by the trainer once
    it knows the family of an ``auto`` job)."""
    facts = FACTS[family]
    unsupported = [f.value for f in eff.output.formats or () if f not in facts.formats]
    if unsupported:
        allowed = ", ".join(sorted(f.value for f in facts.formats))
        yield Violation(
            "output.formats", f"{', '.join(unsupported)} cannot be written for {facts.title} models yet: use {allowed}"
        )
    if eff.training.textual_inversion is not None and not facts.textual_inversion:
        yield Violation(
            "training.textualInversion",
            f"textual inversion is not supported for {facts.title} "
            "models: drop it, or train the text encoders (training.trainTextEncoder)",
        )
    buckets = eff.training.buckets
    if buckets is not None and buckets.enabled and buckets.min_side < facts.min_bucket_side:
        yield Violation(
            "training.buckets.minSide",
            f"{facts.title} takes bucket sides of {facts.min_bucket_side} pixels or more, got {buckets.min_side}",
        )
    if eff.training.resolution < facts.min_resolution:
        yield Violation(
            "training.resolution",
            f"{facts.title} trains at {facts.min_resolution} pixels or more, got {eff.training.resolution}",
        )
    yield from _family_training(eff, facts)


def _family_training(eff: DreamBoothJobSpec, facts) -> Iterator[Violation]:
    t, title = eff.training, facts.title
    scheduler = eff.validation.scheduler
    if scheduler is not None and scheduler not in facts.samplers:  # validates and exports with it
        allowed = ", ".join(sorted(s.value for s in facts.samplers))
        yield Violation("validation.scheduler", f"{scheduler.value} does not sample {title} models: use {allowed}")
    for i, extra in enumerate(eff.validation.compare_schedulers):
        if extra not in facts.samplers:
            allowed = ", ".join(sorted(s.value for s in facts.samplers))
            yield Violation(
                f"validation.compareSchedulers[{i}]", f"{extra.value} does not sample {title} models: use {allowed}"
            )
    if not facts.t5:
        for path, value in (("training.t5", t.t5), ("training.maxSequenceLength", t.max_sequence_length)):
            if value is not None:
                yield Violation(path, f"only applies to models with a T5 text encoder (SD3); {title} has none")
    if t.flow_matching is not None and not facts.flow_matching:
        yield Violation(
            "training.flowMatching", f"only applies to flow-matching models (SD3); {title} trains with DDPM noise"
        )
    if t.snr_gamma and facts.flow_matching:
        yield Violation(
            "training.snrGamma",
            f"Min-SNR weighting is for DDPM models; {title} trains with flow "
            "matching: weigh its loss with training.flowMatching.weighting instead",
        )
    if t.train_text_encoder and not facts.full_text_encoder:
        yield Violation(
            "training.trainTextEncoder",
            f"{title}'s text encoders are not fine-tuned whole here: "
            "use training.method: lora with training.lora.textEncoder: true (its CLIP encoders)",
        )
    if eff.base_model.quantization is Quantization.NF4:
        yield from _nf4(eff, facts)


def _nf4(eff: DreamBoothJobSpec, facts) -> Iterator[Violation]:
    path = "baseModel.quantization"
    if not facts.flow_matching:
        yield Violation(path, f"nf4 is offered for SD3's transformer only, not for {facts.title} models")
    elif eff.resources.gpus_per_node == 0:
        yield Violation(path, "nf4 (bitsandbytes 4-bit) needs GPUs (resources.gpusPerNode >= 1)")
    elif eff.training.method is not Method.LORA:
        yield Violation(
            path,
            "nf4 quantizes the frozen transformer of a LoRA run: use training.method: lora, "
            "or quantization: none for a full fine-tune",
        )
    else:
        yield Violation(
            path,
            "nf4 is not supported yet: use quantization: none (with t5: drop, "
            "gradientCheckpointing and adamw8bit to save memory)",
        )


def named_family(spec, eff):
    if spec.base_model.family is not ModelFamily.AUTO:
        yield from family_violations(eff, spec.base_model.family)
