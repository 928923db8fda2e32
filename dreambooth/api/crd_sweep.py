"""Generate the DreamBoothSweep CustomResourceDefinition from :mod:`dreambooth.api.sweep`.

The template is the DreamBoothJob's own spec schema (its CEL rules included, except the
transition rules, which keep a *job's* fields from changing); the sweep's rules are the
models' (:func:`dreambooth.api.sweep.sweep_violations`) as CEL: each axis value's type and
bounds, a steps value within the template's steps, runs within maxRuns, rows within
:data:`~dreambooth.api.sweep.MAX_ROWS`. ``make crds`` writes it next to the job's CRD.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from annotated_types import Ge, Gt, Le

from dreambooth.api import crd as job_crd
from dreambooth.api.job import CATEGORIES, GROUP, VERSION
from dreambooth.api.presets import ModelFamily, Preset, preset_value
from dreambooth.api.spec import LoraSpec, TrainingSpec
from dreambooth.api.sweep import (
    KIND,
    MAX_AXES,
    MAX_ROWS,
    MAX_SWEEP_NAME,
    PLURAL,
    SAMPLING_AXES,
    SHORT_NAMES,
    SINGULAR,
    VALUE_TYPES,
    AxisField,
    DreamBoothSweepSpec,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"
CRD_PATHS = [Path("crds") / CRD_FILE, Path("charts/dreambooth-operator/crds") / CRD_FILE]

_CEL_TYPES = {
    "number": "type(v) == double || type(v) == int",
    "integer": "type(v) == int",
    "boolean": "type(v) == bool",
    "string": "type(v) == string",
}
_FIELD_OF = {
    AxisField.LEARNING_RATE: (TrainingSpec, "learning_rate"),
    AxisField.TEXT_ENCODER_LEARNING_RATE: (TrainingSpec, "text_encoder_learning_rate"),
    AxisField.SEED: (TrainingSpec, "seed"),
    AxisField.LORA_RANK: (LoraSpec, "rank"),
}


def _bounds(field: AxisField) -> str:
    """CEL: the value ``v`` is within the job field's bounds (numbers), or one of its names."""
    if field is AxisField.METHOD:
        return "v in ['full', 'lora']"
    if field is AxisField.SCHEDULER:
        from dreambooth.api.spec import Sampler

        return "v in [" + ", ".join(f"'{s.value}'" for s in Sampler) + "]"
    if field not in _FIELD_OF:
        return "true"
    model, name = _FIELD_OF[field]
    terms = []
    for meta in model.model_fields[name].metadata:
        for kind, attr, op in ((Gt, "gt", ">"), (Ge, "ge", ">="), (Le, "le", "<=")):
            if isinstance(meta, kind):
                terms.append(f"double(v) {op} {float(getattr(meta, attr))!r}")
    return " && ".join(terms) or "true"


def _axis_rules() -> list[dict[str, str]]:
    rules = []
    for field in AxisField:
        kind = VALUE_TYPES[field]
        rules.append(
            {
                "rule": f"self.field != '{field.value}' || self.values.all(v, ({_CEL_TYPES[kind]}) && "
                f"{_bounds(field)})",
                "message": f"values: {field.value} takes {kind} values within the job field's bounds "
                "(dreambooth validate names the one)",
                "fieldPath": ".values",
            }
        )
    return rules


def _template_steps() -> str:
    """CEL: the template's training.steps, or its preset's for its family."""

    def table(family: ModelFamily) -> str:
        return (
            "{"
            + ", ".join(f"'{p.value}': {preset_value(p, 'training', 'steps', family)}" for p in Preset)
            + "}[self.template.preset]"
        )

    by_family = table(ModelFamily.SD)
    for family in (ModelFamily.SDXL, ModelFamily.SD3):
        by_family = f"(self.template.baseModel.family == '{family.value}' ? {table(family)} : {by_family})"
    return f"(has(self.template.training.steps) ? self.template.training.steps : {by_family})"


def _product(include_sampling: bool) -> str:
    """CEL: the product of the value counts of the axes (the training ones only, or all)."""
    skip = ", ".join(f"'{f.value}'" for f in sorted(SAMPLING_AXES))
    factors = []
    for i in range(MAX_AXES):
        count = f"size(self.axes[{i}].values)"
        if not include_sampling:
            count = f"(self.axes[{i}].field in [{skip}] ? 1 : {count})"
        factors.append(f"(size(self.axes) > {i} ? {count} : 1)")
    return " * ".join(factors)


#: what may change once a sweep exists: its runs are planned from the rest
MUTABLE = ("maxParallel", "suspend")


def _spec_rules() -> list[dict[str, str]]:
    steps = AxisField.STEPS.value
    fixed = [DreamBoothSweepSpec.model_fields[n].alias or n for n in DreamBoothSweepSpec.model_fields]
    return [
        *(
            {
                "rule": f"self.{f} == oldSelf.{f}",
                "message": f"{f} cannot change once the sweep exists (its runs are planned from it): delete "
                "and re-create the sweep (only maxParallel and suspend may change)",
            }
            for f in fixed
            if f not in MUTABLE
        ),
        {
            "rule": "self.axes.all(a, self.axes.exists_one(b, b.field == a.field))",
            "message": "axes: a field is an axis twice: list all its values in one axis",
            "fieldPath": ".axes",
        },
        {
            "rule": f"self.axes.all(a, a.field != '{steps}' || a.values.all(v, type(v) != int || "
            f"(v >= 1 && v <= {_template_steps()})))",
            "message": "axes: a training.steps value is above the template's training.steps (or its "
            "preset's): raise the template's steps or lower the value",
            "fieldPath": ".axes",
        },
        {
            "rule": f"{_product(False)} <= self.maxRuns",
            "message": "axes: the training axes make more runs than maxRuns: drop values or raise maxRuns",
            "fieldPath": ".axes",
        },
        {
            "rule": f"{_product(True)} <= {MAX_ROWS}",
            "message": f"axes: the axes make more than {MAX_ROWS} rows (runs x steps x schedulers): drop values",
            "fieldPath": ".axes",
        },
        {
            "rule": f"!self.axes.exists(a, a.field == '{AxisField.SCHEDULER.value}') || "
            "!has(self.template.validation.enabled) || self.template.validation.enabled",
            "message": "template.validation.enabled: a validation.scheduler axis samples each round with "
            "each scheduler: validation must be enabled",
            "fieldPath": ".template.validation.enabled",
        },
    ]


def _without_transition_rules(node: Any) -> Any:
    """The job's schema without the rules that name oldSelf (a job's fields are immutable;
    a sweep's template is not read again once its runs exist)."""
    if isinstance(node, list):
        return [_without_transition_rules(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "x-kubernetes-validations":
            value = [r for r in value if "oldSelf" not in r["rule"]]
            if not value:
                continue
        out[key] = _without_transition_rules(value)
    return out


def spec_schema() -> dict[str, Any]:
    schema = job_crd._schema_of(DreamBoothSweepSpec)
    template = _without_transition_rules(job_crd.spec_schema())
    template["description"] = schema["properties"]["template"]["description"]
    schema["properties"]["template"] = template
    schema["properties"]["axes"]["items"]["x-kubernetes-validations"] = _axis_rules()
    schema["x-kubernetes-validations"] = _spec_rules()
    return schema


def _status_schema() -> dict[str, Any]:
    from dreambooth.api.sweep_status import DreamBoothSweepStatus

    return job_crd._schema_of(DreamBoothSweepStatus)


def open_api_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A DreamBooth study: a job template trained with every combination of "
        "learning rates, steps, schedulers, ... (its axes), compared side by side.",
        "required": ["spec"],
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_SWEEP_NAME}",
                "message": f"metadata.name: at most {MAX_SWEEP_NAME} characters (its runs are named <sweep>-<number>)",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string", "description": "dreambooth.io/v1alpha1"},
            "kind": {"type": "string", "description": KIND},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema(),
            "status": _status_schema(),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Runs", "type": "string", "jsonPath": ".status.summary"},
    {"name": "Best", "type": "string", "jsonPath": ".status.bestRun"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Compare", "type": "string", "jsonPath": ".status.compare", "priority": 1},
]


def crd() -> dict[str, Any]:
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": PRINTER_COLUMNS,
        "schema": {"openAPIV3Schema": open_api_schema()},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "dreambooth-operator"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": copy.copy(CATEGORIES),
            },
            "versions": [version],
        },
    }


def render() -> str:
    return job_crd.HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def write(root: Path) -> list[Path]:
    text, written = render(), []
    for rel in CRD_PATHS:
        if rel.parts[0] == "charts" and not (root / rel.parts[0] / rel.parts[1]).is_dir():
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        written.append(root / rel)
    return written
