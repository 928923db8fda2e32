"""Rules on what the job reads and which features it turns on: a disabled feature's settings
are refused, never silently ignored (docs/api.md); prompts, outputs, revisions."""

from __future__ import annotations

from collections.abc import Iterator

from dreambooth.api.redact import secret_shape, shown
from dreambooth.api.rules.violation import Violation
from dreambooth.api.spec import (
    DreamBoothJobSpec,
    ExportChoice,
)
from dreambooth.api.uris import Scheme, UriError, parse_uri


def prior_needs_class_prompt(spec, eff):
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
_VALIDATION_SETTINGS = (
    ("every_steps", "everySteps"),
    ("inference_steps", "inferenceSteps"),
    ("negative_prompt", "negativePrompt"),
)


def prior_settings_need_prior(spec, eff):
    """Settings of a disabled feature are refused, never silently ignored (docs/api.md)."""
    if eff.prior.enabled:
        return
    if spec.prior.uri:
        yield Violation("prior.uri", "class images are only used when prior.enabled is true")
    for name, wire in _PRIOR_SETTINGS:
        if getattr(spec.prior, name) is not None:
            yield Violation(
                f"prior.{wire}", "only used when prior.enabled is true: remove it, or set prior.enabled: true"
            )
    if spec.prior.loss_weight != 1.0:
        yield Violation(
            "prior.lossWeight", "only used when prior.enabled is true: remove it, or set prior.enabled: true"
        )


def compare_schedulers_once(spec, eff):
    """validation.compareSchedulers draws each round again with other schedulers: each once."""
    extras = eff.validation.compare_schedulers
    for i, extra in enumerate(extras):
        if extra == eff.validation.scheduler or extra in extras[:i]:
            yield Violation(
                f"validation.compareSchedulers[{i}]",
                f"{extra.value} is sampled already: list each scheduler once, and not validation.scheduler",
            )


def validation_settings_need_validation(spec, eff):
    if spec.validation.enabled:
        return
    found = [wire for name, wire in _VALIDATION_SETTINGS if getattr(spec.validation, name) is not None]
    if spec.validation.prompts:
        found.insert(0, "prompts")
    if spec.validation.compare_schedulers:
        found.append("compareSchedulers")
    for wire in found:
        yield Violation(
            f"validation.{wire}",
            "only used when validation.enabled is true: remove it, or set validation.enabled: true",
        )


def class_prompt_differs(spec, eff):
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


def no_credentials_in_prompts(spec, eff):
    for path, prompt in _prompts(spec):
        kind = secret_shape(prompt)
        if kind:
            yield Violation(
                path,
                f"looks like it holds {kind} (not shown): prompts are stored in "
                "the job, the trainer's config and its logs; remove it (credentials "
                "reach pods only from Secrets, spec.storage.credentialsSecret)",
            )


def _inside(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or below it (same scheme and bucket or claim)."""
    try:
        a, b = (parse_uri(u, allowed=set(Scheme)) for u in (inner, outer))
    except UriError:  # reported on the field itself
        return False
    parts = lambda u: [s for s in u.path.split("/") if s]
    return (a.scheme, a.authority) == (b.scheme, b.authority) and parts(a)[: len(parts(b))] == parts(b)


def outputs_outside_the_photos(spec, eff):
    photos = spec.instance.uri
    for path, uri in (("output.uri", spec.output.uri), ("prior.uri", spec.prior.uri)):
        if uri and _inside(uri, photos):
            what = "checkpoints, samples and models" if path == "output.uri" else "class images"
            yield Violation(
                path,
                f"is inside instance.uri ({shown(photos)}): the {what} there would "
                "be read as photos of the subject; use a prefix outside it",
            )


def revision_only_for_hub(spec, eff):
    if spec.base_model.revision is None:
        return
    uri = parse_uri(spec.base_model.uri, allowed=set(Scheme))
    if uri.scheme is not Scheme.HF:
        yield Violation("baseModel.revision", "only applies to hf:// models")
    elif uri.revision:
        yield Violation("baseModel.revision", "given twice: drop it or the @revision in baseModel.uri")


def evaluation_settings(spec, eff):
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
            yield Violation(
                "evaluation.model.revision", "given twice: drop it or the @revision in evaluation.model.uri"
            )
