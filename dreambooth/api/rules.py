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
from dreambooth.api.redact import secret_shape, shown
from dreambooth.api.spec import (
    LORA_FORMATS,
    DreamBoothJobSpec,
    ExportChoice,
    Method,
    MixedPrecision,
    ModelFamily,
    Quantization,
    T5Mode,
)
from dreambooth.api.uris import Scheme, UriError, parse_uri


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


#: what a disabled feature's settings are called, and when one counts as set (a value the
#: CRD defaults counts only when it differs from its default)
_PRIOR_SETTINGS = (("class_prompt", "classPrompt"), ("num_images", "numImages"))
#: (validation.scheduler is not one: it is also the exported pipeline's scheduler)
_VALIDATION_SETTINGS = (("every_steps", "everySteps"), ("inference_steps", "inferenceSteps"),
                        ("negative_prompt", "negativePrompt"))


@rule
def _prior_settings_need_prior(spec, eff):
    """Settings of a disabled feature are refused, never silently ignored (docs/api.md)."""
    if eff.prior.enabled:
        return
    if spec.prior.uri:
        yield Violation("prior.uri", "class images are only used when prior.enabled is true")
    for name, wire in _PRIOR_SETTINGS:
        if getattr(spec.prior, name) is not None:
            yield Violation(f"prior.{wire}", "only used when prior.enabled is true: remove it, "
                            "or set prior.enabled: true")
    if spec.prior.loss_weight != 1.0:
        yield Violation("prior.lossWeight", "only used when prior.enabled is true: remove it, "
                        "or set prior.enabled: true")


@rule
def _compare_schedulers_once(spec, eff):
    """validation.compareSchedulers draws each round again with other schedulers: each once."""
    extras = eff.validation.compare_schedulers
    for i, extra in enumerate(extras):
        if extra == eff.validation.scheduler or extra in extras[:i]:
            yield Violation(f"validation.compareSchedulers[{i}]", f"{extra.value} is sampled already: list "
                            "each scheduler once, and not validation.scheduler")


@rule
def _validation_settings_need_validation(spec, eff):
    if spec.validation.enabled:
        return
    found = [wire for name, wire in _VALIDATION_SETTINGS if getattr(spec.validation, name) is not None]
    if spec.validation.prompts:
        found.insert(0, "prompts")
    if spec.validation.compare_schedulers:
        found.append("compareSchedulers")
    for wire in found:
        yield Violation(f"validation.{wire}", "only used when validation.enabled is true: "
                        "remove it, or set validation.enabled: true")


@rule
def _class_prompt_differs(spec, eff):
    if spec.prior.class_prompt is not None and spec.prior.class_prompt == spec.instance.prompt:
        yield Violation(
            "prior.classPrompt",
            "is the same as instance.prompt: the class prompt names the class without the "
            "subject's identifier (e.g. 'a photo of a cat' for 'a photo of zwx cat')",
        )


def _prompts(spec: DreamBoothJobSpec) -> Iterator[tuple[str, str]]:
    yield "instance.prompt", spec.instance.prompt
    if spec.prior.class_prompt is not None:
        yield "prior.classPrompt", spec.prior.class_prompt
    for i, prompt in enumerate(spec.validation.prompts):
        yield f"validation.prompts[{i}]", prompt
    if spec.validation.negative_prompt is not None:
        yield "validation.negativePrompt", spec.validation.negative_prompt


@rule
def _no_credentials_in_prompts(spec, eff):
    for path, prompt in _prompts(spec):
        kind = secret_shape(prompt)
        if kind:
            yield Violation(path, f"looks like it holds {kind} (not shown): prompts are stored in "
                            "the job, the trainer's config and its logs; remove it (credentials "
                            "reach pods only from Secrets, spec.storage.credentialsSecret)")


def _inside(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or below it (same scheme and bucket or claim)."""
    try:
        a, b = (parse_uri(u, allowed=set(Scheme)) for u in (inner, outer))
    except UriError:  # reported on the field itself
        return False
    parts = lambda u: [s for s in u.path.split("/") if s]
    return (a.scheme, a.authority) == (b.scheme, b.authority) and \
        parts(a)[:len(parts(b))] == parts(b)


@rule
def _outputs_outside_the_photos(spec, eff):
    photos = spec.instance.uri
    for path, uri in (("output.uri", spec.output.uri), ("prior.uri", spec.prior.uri)):
        if uri and _inside(uri, photos):
            what = "checkpoints, samples and models" if path == "output.uri" else "class images"
            yield Violation(path, f"is inside instance.uri ({shown(photos)}): the {what} there would "
                            "be read as photos of the subject; use a prefix outside it")


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


@rule
def _buckets(spec, eff):
    b, resolution, where = eff.training.buckets, eff.training.resolution, "training.buckets"
    if b is None or not b.enabled:
        for name, side in (("minSide", b and b.min_side), ("maxSide", b and b.max_side)):
            if side is not None:
                yield Violation(f"{where}.{name}", "only applies when training.buckets.enabled is true (off "
                                "by default for Stable Diffusion 1.x/2.x)")
        return
    for name, side in (("minSide", b.min_side), ("maxSide", b.max_side)):
        if side % b.step:
            yield Violation(f"{where}.{name}", f"must be a multiple of training.buckets.step ({b.step}), got "
                            f"{side}: e.g. {max(b.step, side // b.step * b.step)}")
    if b.min_side > b.max_side:
        yield Violation(f"{where}.minSide", f"must be at most training.buckets.maxSide ({b.max_side}), "
                        f"got {b.min_side}")
    if resolution % b.step:
        yield Violation(f"{where}.step", f"must divide training.resolution ({resolution}), the side of the "
                        f"square bucket; got {b.step}")
    elif b.max_side < resolution:
        yield Violation(f"{where}.maxSide", f"must be at least training.resolution ({resolution}): buckets "
                        f"hold about {resolution}x{resolution} pixels; got {b.max_side}")
    elif b.min_side > resolution:
        yield Violation(f"{where}.minSide", f"must be at most training.resolution ({resolution}), got "
                        f"{b.min_side}")


@rule
def _textual_inversion_token(spec, eff):
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
            f"{shown(ti.placeholder_token)} must appear as a word in instance.prompt "
            f"({shown(eff.instance.prompt)})",
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
def _tolerations(spec, eff):
    """The API server's rules for a pod's tolerations."""
    for i, t in enumerate(spec.resources.tolerations):
        at = f"resources.tolerations[{i}]"
        if t.operator == "Exists" and t.value:
            yield Violation(f"{at}.value", "operator Exists takes no value (it matches any value "
                            "of the key): remove value, or use operator: Equal")
        if not t.key and t.operator != "Exists":
            yield Violation(f"{at}.operator", "a toleration without a key matches every taint and "
                            "needs operator: Exists; or set key")
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            yield Violation(f"{at}.tolerationSeconds", "only applies to effect NoExecute: set "
                            "effect: NoExecute, or remove tolerationSeconds")


@rule
def _evaluation(spec, eff):
    ev = spec.evaluation
    if ev.enabled and not eff.validation.enabled:
        yield Violation("evaluation.enabled", "evaluates the sample rounds: needs validation.enabled: true")
    if eff.output.export is ExportChoice.BEST and not ev.enabled:
        yield Violation("output.export", "best needs evaluation.enabled: true (the score picks the checkpoint)")
    if ev.model.revision is not None:
        uri = parse_uri(ev.model.uri, allowed=set(Scheme)) if ev.model.uri else None
        if uri is None or uri.scheme is not Scheme.HF:
            yield Violation("evaluation.model.revision", "only applies to an hf:// evaluation.model.uri")
        elif uri.revision:
            yield Violation("evaluation.model.revision",
                            "given twice: drop it or the @revision in evaluation.model.uri")


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
    buckets = eff.training.buckets
    if buckets is not None and buckets.enabled and buckets.min_side < facts.min_bucket_side:
        yield Violation("training.buckets.minSide", f"{facts.title} takes bucket sides of "
                        f"{facts.min_bucket_side} pixels or more, got {buckets.min_side}")
    if eff.training.resolution < facts.min_resolution:
        yield Violation("training.resolution", f"{facts.title} trains at {facts.min_resolution} pixels or more, "
                        f"got {eff.training.resolution}")
    yield from _family_training(eff, facts)


def _family_training(eff: DreamBoothJobSpec, facts) -> Iterator[Violation]:
    t, title = eff.training, facts.title
    scheduler = eff.validation.scheduler
    if eff.validation.enabled and scheduler is not None and scheduler not in facts.samplers:
        allowed = ", ".join(sorted(s.value for s in facts.samplers))
        yield Violation("validation.scheduler", f"{scheduler.value} does not sample {title} models: use {allowed}")
    for i, extra in enumerate(eff.validation.compare_schedulers):
        if extra not in facts.samplers:
            allowed = ", ".join(sorted(s.value for s in facts.samplers))
            yield Violation(f"validation.compareSchedulers[{i}]", f"{extra.value} does not sample {title} models: "
                            f"use {allowed}")
    if not facts.t5:
        for path, value in (("training.t5", t.t5), ("training.maxSequenceLength", t.max_sequence_length)):
            if value is not None:
                yield Violation(path, f"only applies to models with a T5 text encoder (SD3); {title} has none")
    if t.flow_matching is not None and not facts.flow_matching:
        yield Violation("training.flowMatching", f"only applies to flow-matching models (SD3); {title} trains "
                        "with DDPM noise")
    if t.snr_gamma and facts.flow_matching:
        yield Violation("training.snrGamma", f"Min-SNR weighting is for DDPM models; {title} trains with flow "
                        "matching: weigh its loss with training.flowMatching.weighting instead")
    if t.train_text_encoder and not facts.full_text_encoder:
        yield Violation("training.trainTextEncoder", f"{title}'s text encoders are not fine-tuned whole here: "
                        "use training.method: lora with training.lora.textEncoder: true (its CLIP encoders)")
    if eff.base_model.quantization is Quantization.NF4:
        yield from _nf4(eff, facts)


def _nf4(eff: DreamBoothJobSpec, facts) -> Iterator[Violation]:
    path = "baseModel.quantization"
    if not facts.flow_matching:
        yield Violation(path, f"nf4 is offered for SD3's transformer only, not for {facts.title} models")
    elif eff.resources.gpus_per_node == 0:
        yield Violation(path, "nf4 (bitsandbytes 4-bit) needs GPUs (resources.gpusPerNode >= 1)")
    elif eff.training.method is not Method.LORA:
        yield Violation(path, "nf4 quantizes the frozen transformer of a LoRA run: use training.method: lora, "
                        "or quantization: none for a full fine-tune")
    else:
        yield Violation(path, "nf4 is not supported yet: use quantization: none (with t5: drop, "
                        "gradientCheckpointing and adamw8bit to save memory)")


@rule
def _t5_length_needs_t5(spec, eff):
    if spec.training.max_sequence_length is not None and eff.training.t5 is T5Mode.DROP:
        yield Violation("training.maxSequenceLength", "is the prompt length T5 reads, and training.t5 is drop: "
                        "remove maxSequenceLength, or keep T5")


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
