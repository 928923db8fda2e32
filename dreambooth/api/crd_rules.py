"""The CRD's CEL rules (``x-kubernetes-validations``) by schema path: what may not change
once a job exists, and the cross-field rules of dreambooth.api.rules that the spec alone
decides, so the API server refuses them too (dreambooth.api.crd attaches them; the family
rules and preset-aware expressions come from dreambooth.api.cel)."""

from __future__ import annotations

from dreambooth.api.cel import (
    FORMATS,
    LORA,
    LORA_FORMATS_CEL,
    PRIOR,
    TEXT_ENCODER,
    cel_string,
    family_rules,
    preset_gives,
)
from dreambooth.api.pod import (
    CREDENTIAL_PATTERN,
    CREDENTIAL_WHY,
    MIG_PREFIX,
    OWN_FIELDS,
    RESERVED_ENV,
    reserved_label,
)
from dreambooth.api.redact import SECRET_PATTERN
from dreambooth.api.spec import LORA_FORMATS, DreamBoothJobSpec, RunPolicySpec

#: what may change once a job exists (mirrored onto the Job); CEL refuses every other edit
MUTABLE_RUN_POLICY = frozenset({"suspend"})


def _immutable(field: str, optional: bool = False) -> dict[str, str]:
    rule = f"self.{field} == oldSelf.{field}"
    if optional:
        rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || {rule})"
    return {
        "rule": rule,
        "message": f"{field} cannot change once the job exists; delete and re-create the job "
        "(only runPolicy.suspend may change)",
    }


_SETTINGS_NEED = "only used when {0}.enabled is true: remove it, or set {0}.enabled: true"


def _meaning_rules() -> list[dict[str, str]]:
    """dreambooth.api.rules' cross-field rules that need the preset's values, written with
    them (the preset and family are in the spec, so the API server can apply them)."""
    never = lambda field: f"(!has(self.{field}) || {{}})".format
    rules = [
        (
            (
                f"!{PRIOR} || has(self.prior.classPrompt) || "
                f"{preset_gives('prior', 'classPrompt', lambda v: v is not None)}"
            ),
            "prior.classPrompt is required when prior preservation is enabled",
        ),
        *(
            (f"!has(self.prior.{f}) || {PRIOR}", f"prior.{f} is " + _SETTINGS_NEED.format("prior"))
            for f in ("classPrompt", "numImages")
        ),
        (
            f"!has(self.prior.lossWeight) || self.prior.lossWeight == 1.0 || {PRIOR}",
            "prior.lossWeight is " + _SETTINGS_NEED.format("prior"),
        ),
        (
            "!has(self.validation.enabled) || self.validation.enabled || "
            "((!has(self.validation.prompts) || size(self.validation.prompts) == 0) && "
            "(!has(self.validation.compareSchedulers) || size(self.validation.compareSchedulers) == 0) && "
            + " && ".join(f"!has(self.validation.{f})" for f in ("everySteps", "inferenceSteps", "negativePrompt"))
            + ")",
            "validation.prompts, compareSchedulers, everySteps, inferenceSteps and negativePrompt are "
            + _SETTINGS_NEED.format("validation"),
        ),
        (
            never("training.textEncoderSteps")(TEXT_ENCODER),
            "training.textEncoderSteps only applies when training.trainTextEncoder is true",
        ),
        (
            never("training.textEncoderLearningRate")(TEXT_ENCODER),
            "training.textEncoderLearningRate only applies when training.trainTextEncoder is true",
        ),
        (
            f"!(has(self.training.trainTextEncoder) && self.training.trainTextEncoder && {LORA})",
            "training.trainTextEncoder with method lora: use training.lora.textEncoder: true instead",
        ),
        (
            f"!(has(self.training.ema) && self.training.ema && {LORA})",
            "training.ema is only supported with training.method: full",
        ),
        (
            f"!has(self.training.textualInversion) || !{LORA}",
            "training.textualInversion (textual inversion + DreamBooth) needs training.method: full",
        ),
        (
            f"!has({FORMATS}) || {FORMATS}.all(f, {FORMATS}.exists_one(g, g == f))",
            "output.formats lists a format twice",
        ),
        (
            f"!has({FORMATS}) || !{LORA} || {FORMATS}.all(f, f in [{LORA_FORMATS_CEL}])",
            (
                "output.formats: a LoRA run exports lora and/or lora-kohya; diffusers and "
                "safetensors need training.method: full"
            ),
        ),
        *family_rules(),
        (
            (
                "!has(self.training.textualInversion) || string(' ' + self.instance.prompt + ' ')"
                ".contains(' ' + self.training.textualInversion.placeholderToken + ' ')"
            ),
            "training.textualInversion.placeholderToken must appear as a word in instance.prompt",
        ),
        (
            "!has(self.prior.classPrompt) || self.prior.classPrompt != self.instance.prompt",
            "prior.classPrompt must differ from instance.prompt (the class without the identifier)",
        ),
        *(
            (
                (
                    f"!has(self.{field}) || !string(self.{field} + '/').startsWith("
                    "self.instance.uri.endsWith('/') ? self.instance.uri : self.instance.uri + '/')"
                ),
                f"{field} must not be inside instance.uri (it would be read as photos of the subject)",
            )
            for field in ("output.uri", "prior.uri")
        ),
        (
            "!has(self.baseModel.revision) || self.baseModel.uri.startsWith('hf://')",
            "baseModel.revision only applies to hf:// models",
        ),
        (
            "!has(self.baseModel.revision) || !self.baseModel.uri.contains('@')",
            "baseModel.revision is given twice: drop it or the @revision in baseModel.uri",
        ),
    ]
    return [{"rule": r, "message": m} for r, m in rules]


def _no_secret(field: str) -> str:
    return f"!{field}.matches({cel_string(SECRET_PATTERN)})"


_SECRET_MESSAGE = (
    "looks like it holds a credential: prompts are stored in the job, the trainer's config and its logs; remove it"
)


def cel_rules() -> dict[tuple[str, ...], list[dict[str, str]]]:
    """CEL rules by schema path (property names below spec). Mirrors dreambooth.api.rules
    where a rule does not depend on preset values the API server cannot see."""
    spec_fields = [n for n in DreamBoothJobSpec.model_fields if n != "run_policy"]
    processes = "self.resources.nodes * (self.resources.gpusPerNode == 0 ? 1 : self.resources.gpusPerNode)"
    lora_method = LORA
    return {
        (): [
            *(_immutable(DreamBoothJobSpec.model_fields[n].alias or n) for n in spec_fields),
            {
                "rule": "!has(self.validation.everySteps) || !has(self.training.steps) || "
                "(has(self.validation.enabled) && !self.validation.enabled) || "
                "self.validation.everySteps <= self.training.steps",
                "message": "validation.everySteps must be at most training.steps",
            },
            {
                "rule": "!has(self.checkpointing.everySteps) || !has(self.training.steps) || "
                "self.checkpointing.everySteps <= self.training.steps",
                "message": "checkpointing.everySteps must be at most training.steps",
            },
            {
                "rule": f"!has(self.training.lora) || {lora_method}",
                "message": "training.lora needs training.method: lora",
            },
            {
                "rule": "!has(self.output.formats) || !self.output.formats.exists(f, "
                f"{' || '.join(f'f == {cel_string(v)}' for v in sorted(LORA_FORMATS))}) || {lora_method}",
                "message": "output.formats: lora and lora-kohya need training.method: lora (a full "
                "fine-tune has no adapters to export)",
            },
            {
                "rule": "self.training.mixedPrecision != 'fp16' || self.resources.gpusPerNode > 0",
                "message": "training.mixedPrecision fp16 needs GPUs (resources.gpusPerNode >= 1)",
            },
            {
                "rule": "!has(self.training.batchSize) || self.training.batchSize % "
                f"({processes} * self.training.gradientAccumulationSteps) == 0",
                "message": "training.batchSize must be a multiple of processes (nodes x "
                "gpusPerNode) x gradientAccumulationSteps",
            },
            {
                "rule": f"!has(self.prior.uri) || {PRIOR}",
                "message": "prior.uri is only used when prior.enabled is true",
            },
            {
                "rule": "!has(self.output.export) || self.output.export != 'best' || "
                "(has(self.evaluation.enabled) && self.evaluation.enabled)",
                "message": "output.export best needs evaluation.enabled: true",
            },
            {
                "rule": "!has(self.evaluation.enabled) || !self.evaluation.enabled || "
                "!has(self.validation.enabled) || self.validation.enabled",
                "message": "evaluation.enabled needs validation.enabled: true",
            },
            *_meaning_rules(),
        ],
        ("instance",): [{"rule": _no_secret("self.prompt"), "message": f"instance.prompt {_SECRET_MESSAGE}"}],
        ("prior",): [
            {
                "rule": f"!has(self.classPrompt) || {_no_secret('self.classPrompt')}",
                "message": f"prior.classPrompt {_SECRET_MESSAGE}",
            }
        ],
        ("validation",): [
            {
                "rule": f"!has(self.prompts) || self.prompts.all(p, {_no_secret('p')})",
                "message": f"validation.prompts: an item {_SECRET_MESSAGE}",
            },
            {
                "rule": f"!has(self.negativePrompt) || {_no_secret('self.negativePrompt')}",
                "message": f"validation.negativePrompt {_SECRET_MESSAGE}",
            },
            {
                "rule": "!has(self.compareSchedulers) || self.compareSchedulers.all(s, "
                "self.compareSchedulers.exists_one(t, t == s) && (!has(self.scheduler) || s != self.scheduler))",
                "message": "validation.compareSchedulers: list each scheduler once, and not validation.scheduler",
            },
        ],
        ("training", "textualInversion"): [
            {
                "rule": "self.placeholderToken != self.initializerToken",
                "message": "training.textualInversion.placeholderToken must differ from "
                "initializerToken (a new token, not the word it starts from)",
            }
        ],
        ("resources", "tolerations", ITEMS): _toleration_rules(),
        ("training",): [
            {
                "rule": "!has(self.textEncoderSteps) || !has(self.steps) || self.textEncoderSteps <= self.steps",
                "message": "training.textEncoderSteps must be at most training.steps",
            },
            {
                "rule": "self.lrWarmupSteps == 0 || !has(self.steps) || self.lrWarmupSteps < self.steps",
                "message": "training.lrWarmupSteps must be less than training.steps",
            },
        ],
        ("training", "buckets"): [
            *(
                {
                    "rule": f"!has(self.{side}) || self.{side} % self.step == 0",
                    "message": f"training.buckets.{side} must be a multiple of training.buckets.step",
                }
                for side in ("minSide", "maxSide")
            ),
            {
                "rule": "!has(self.minSide) || !has(self.maxSide) || self.minSide <= self.maxSide",
                "message": "training.buckets.minSide must be at most training.buckets.maxSide",
            },
        ],
        ("resources",): _resources_rules(),
        ("resources", "env", ITEMS): _env_rules(),
        # every field but suspend, so that a new one cannot be forgotten
        ("runPolicy",): [
            _immutable(f.alias or n, optional=f.default is None)
            for n, f in RunPolicySpec.model_fields.items()
            if n not in MUTABLE_RUN_POLICY
        ],
    }


#: a path part of :func:`cel_rules` that means "each item of this list"
ITEMS = "[]"


def _resources_rules() -> list[dict[str, str]]:
    """dreambooth.api.rules' MIG and extraResources rules that need no string scanning of
    map keys (whose length a schema cannot bound, so the API server's CEL cost estimate would
    be huge); the operator checks the rest."""
    own = " || ".join(f"{cel_string(n)} in self.extraResources" for n in OWN_FIELDS)
    return [
        {
            "rule": f"!self.gpu.resourceName.startsWith({cel_string(MIG_PREFIX)}) || self.gpusPerNode <= 1",
            "message": "resources.gpusPerNode must be 1 with a MIG resource (nvidia.com/mig-*): "
            "a MIG slice is one CUDA device and NCCL does not run between slices of one pod; "
            "use gpusPerNode: 1, or whole GPUs (nvidia.com/gpu)",
        },
        {
            "rule": "!has(self.extraResources) || !(self.gpu.resourceName in self.extraResources)",
            "message": "resources.extraResources must not name the job's GPU: request it with "
            "resources.gpusPerNode (and resources.gpu.resourceName)",
        },
        {
            "rule": f"!has(self.extraResources) || !({own})",
            "message": "resources.extraResources must not name cpu or memory: use resources.cpu and resources.memory",
        },
    ]


def _toleration_rules() -> list[dict[str, str]]:
    """The API server's rules for a pod's tolerations (dreambooth.api.rules.pods.tolerations)."""
    return [
        {
            "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "message": "resources.tolerations: operator Exists takes no value",
        },
        {
            "rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "message": "resources.tolerations: a toleration without a key needs operator: Exists",
        },
        {
            "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "message": "resources.tolerations: tolerationSeconds only applies to effect NoExecute",
        },
    ]


def _env_rules() -> list[dict[str, str]]:
    """dreambooth.api.pod's reserved names, one rule per group, for each resources.env item."""
    rules = []
    for reserved in RESERVED_ENV:
        tests = [f"self.name.startsWith({cel_string(p)})" for p in reserved.prefixes]
        if reserved.names:
            tests.insert(0, f"self.name in [{', '.join(map(cel_string, reserved.names))}]")
        rules.append(
            {
                "rule": f"!({' || '.join(tests)})",
                "message": f"resources.env: {reserved_label(reserved)} are reserved ({reserved.why}): "
                f"{reserved.action}",
            }
        )
    rules.append(
        {
            "rule": f"!self.name.matches({cel_string(CREDENTIAL_PATTERN)})",
            "message": f"resources.env: a name that {CREDENTIAL_WHY}",
        }
    )
    return rules
