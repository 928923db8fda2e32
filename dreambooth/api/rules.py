"""Cross-field rules of a DreamBoothJob spec, checked on its effective values.

Each rule is a small function of the effective spec (preset applied) that yields
:class:`Violation` s naming the field to fix (its wire path below ``spec``) and what is
allowed. Single-field bounds and enums are the models' job; rules the API server can check
by itself are repeated as CEL in :mod:`dreambooth.api.crd`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dreambooth.api.families import FACTS
from dreambooth.api.pod import (
    env_name_problem,
    is_hugepages,
    is_mig,
    is_zero,
    quantity_problem,
    resource_name_problem,
)
from dreambooth.api.spec import DreamBoothJobSpec, Method, MixedPrecision, ModelFamily, OutputFormat
from dreambooth.api.uris import Scheme, parse_uri


@dataclass(frozen=True)
class Violation:
    path: str
    message: str


Rule = Callable[[DreamBoothJobSpec, DreamBoothJobSpec], Iterator[Violation]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


# Every rule gets (spec as written, effective spec). ``spec`` tells what the user set.


@rule
def _prior_needs_class_prompt(spec, eff):
    if eff.prior.enabled and not eff.prior.class_prompt:
        yield Violation(
            "prior.classPrompt",
            "required when prior preservation is enabled: the subject's class without the "
            "identifier, e.g. 'a photo of a cat'",
        )


@rule
def _prior_uri_needs_prior(spec, eff):
    if spec.prior.uri and not eff.prior.enabled:
        yield Violation("prior.uri", "class images are only used when prior.enabled is true")


@rule
def _text_encoder_settings(spec, eff):
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


@rule
def _lora_settings(spec, eff):
    t = eff.training
    if spec.training.lora is not None and t.method is not Method.LORA:
        yield Violation("training.lora", "LoRA settings need training.method: lora")
    if t.method is Method.LORA:
        if spec.training.train_text_encoder:
            yield Violation(
                "training.trainTextEncoder",
                "with method lora, train text-encoder adapters with training.lora.textEncoder: "
                "true instead",
            )
        if t.ema:
            yield Violation("training.ema", "EMA is only supported with training.method: full")
        if t.textual_inversion is not None:
            yield Violation(
                "training.textualInversion",
                "textual inversion + DreamBooth needs training.method: full",
            )


@rule
def _steps_bounds(spec, eff):
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


@rule
def _batch_divides(spec, eff):
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


@rule
def _precision_needs_gpu(spec, eff):
    if eff.training.mixed_precision is MixedPrecision.FP16 and eff.resources.gpus_per_node == 0:
        yield Violation(
            "training.mixedPrecision",
            "fp16 needs GPUs (resources.gpusPerNode >= 1): use no or bf16 on CPUs",
        )


@rule
def _output_formats(spec, eff):
    formats = eff.output.formats or []
    if len(set(formats)) != len(formats):
        yield Violation("output.formats", "lists a format twice")
    if eff.training.method is Method.LORA:
        full = [f.value for f in formats if f is not OutputFormat.LORA]
        if full:
            yield Violation(
                "output.formats",
                f"{', '.join(full)} need training.method: full; a LoRA run exports [lora]",
            )
    elif OutputFormat.LORA in formats:
        yield Violation("output.formats", "lora needs training.method: lora")


@rule
def _textual_inversion_token(spec, eff):
    ti = eff.training.textual_inversion
    if ti is not None and ti.placeholder_token not in eff.instance.prompt.split():
        yield Violation(
            "training.textualInversion.placeholderToken",
            f"{ti.placeholder_token!r} must appear as a word in instance.prompt "
            f"({eff.instance.prompt!r})",
        )


@rule
def _revision_only_for_hub(spec, eff):
    if spec.base_model.revision is None:
        return
    uri = parse_uri(spec.base_model.uri, allowed=set(Scheme))
    if uri.scheme is not Scheme.HF:
        yield Violation("baseModel.revision", "only applies to hf:// models")
    elif uri.revision:
        yield Violation(
            "baseModel.revision", "given twice: drop it or the @revision in baseModel.uri"
        )


@rule
def _mig_is_one_device(spec, eff):
    gpu = spec.resources.gpu.resource_name
    if is_mig(gpu) and spec.resources.gpus_per_node > 1:
        yield Violation(
            "resources.gpusPerNode",
            f"{gpu} is a MIG slice, one CUDA device per process, and NCCL does not run between "
            f"MIG slices of one pod: use gpusPerNode: 1, or whole GPUs (resources.gpu."
            f"resourceName: nvidia.com/gpu) for {spec.resources.gpus_per_node} GPUs per pod",
        )


@rule
def _pod_env(spec, eff):
    seen: set[str] = set()
    for i, var in enumerate(spec.resources.env):
        problem = env_name_problem(var.name)
        if problem is None and var.name in seen:
            problem = f"{var.name} is listed twice: keep one"
        if problem:
            yield Violation(f"resources.env[{i}].name", problem)
        seen.add(var.name)


@rule
def _extra_resources(spec, eff):
    res = spec.resources
    for name, quantity in res.extra_resources.items():
        problem = resource_name_problem(name, res.gpu.resource_name) or quantity_problem(
            name, quantity)
        if problem:
            yield Violation(f"resources.extraResources.{name}", problem)
    hugepages = [n for n, q in res.extra_resources.items() if is_hugepages(n) and not is_zero(q)]
    if hugepages and not (res.cpu or res.memory):
        yield Violation(
            "resources.extraResources",
            f"{hugepages[0]} needs a CPU or memory request as well (Kubernetes refuses the pod "
            "otherwise): set resources.memory (or resources.cpu)",
        )


def family_violations(eff: DreamBoothJobSpec, family: ModelFamily) -> Iterator[Violation]:
    """What ``family`` cannot take of the effective spec ``eff`` (also run by the trainer once
    it knows the family of an ``auto`` job)."""
    facts = FACTS[family]
    unsupported = [f.value for f in eff.output.formats or () if f not in facts.formats]
    if unsupported:
        allowed = ", ".join(sorted(f.value for f in facts.formats))
        yield Violation("output.formats", f"{', '.join(unsupported)} cannot be written for {facts.title} "
                        f"models yet: use {allowed}")
    if eff.training.textual_inversion is not None and not facts.textual_inversion:
        yield Violation("training.textualInversion", f"textual inversion is not supported for {facts.title} "
                        "models: drop it, or train the text encoders (training.trainTextEncoder)")
    if eff.training.resolution < facts.min_resolution:
        yield Violation("training.resolution", f"{facts.title} trains at {facts.min_resolution} pixels or more, "
                        f"got {eff.training.resolution}")


@rule
def _family(spec, eff):
    if spec.base_model.family is not ModelFamily.AUTO:
        yield from family_violations(eff, spec.base_model.family)


def violations(spec: DreamBoothJobSpec) -> list[Violation]:
    """Every cross-field rule that ``spec`` breaks, in a stable order."""
    from dreambooth.api.resolve import effective_spec

    eff = effective_spec(spec)
    return [v for check in RULES for v in check(spec, eff)]


def first_violation(spec: DreamBoothJobSpec) -> Violation | None:
    found = violations(spec)
    return found[0] if found else None
