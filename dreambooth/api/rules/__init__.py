"""Cross-field rules of a DreamBoothJob spec, checked on its effective values.

Each rule is a small function of the effective spec (preset applied) that yields
:class:`Violation` s naming the field to fix (its wire path below ``spec``) and what is
allowed. Single-field bounds and enums are the models' job; rules the API server can check
by itself are repeated as CEL in :mod:`dreambooth.api.crd`.

The rules live by what they look at: :mod:`.features` (what the job reads, which features
it turns on), :mod:`.training` (the training settings), :mod:`.pods` (what goes into the
pods) and :mod:`.family` (what a model family cannot take). :data:`RULES` lists them in the
order their violations are reported.
"""

from __future__ import annotations

from dreambooth.api.rules import family, features, pods, training
from dreambooth.api.rules.family import family_violations
from dreambooth.api.rules.violation import Rule, Violation
from dreambooth.api.spec import DreamBoothJobSpec

__all__ = ["RULES", "Rule", "Violation", "family_violations", "first_violation", "violations"]

RULES: tuple[Rule, ...] = (
    features.prior_needs_class_prompt,
    features.prior_settings_need_prior,
    features.compare_schedulers_once,
    features.validation_settings_need_validation,
    features.class_prompt_differs,
    features.no_credentials_in_prompts,
    features.outputs_outside_the_photos,
    training.text_encoder_settings,
    training.lora_settings,
    training.steps_bounds,
    training.batch_divides,
    training.precision_needs_gpu,
    training.output_formats,
    training.bucket_settings,
    training.textual_inversion_token,
    features.revision_only_for_hub,
    pods.tolerations,
    features.evaluation_settings,
    pods.mig_is_one_device,
    pods.pod_env,
    pods.extra_resources,
    training.t5_length_needs_t5,
    family.named_family,
)


def violations(spec: DreamBoothJobSpec) -> list[Violation]:
    """Every cross-field rule that ``spec`` breaks, in a stable order."""
    from dreambooth.api.resolve import effective_spec

    eff = effective_spec(spec)
    return [v for check in RULES for v in check(spec, eff)]


def first_violation(spec: DreamBoothJobSpec) -> Violation | None:
    found = violations(spec)
    return found[0] if found else None
