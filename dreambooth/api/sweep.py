"""The DreamBoothSweep resource: one study of a subject as a unit (the seed's method).

A sweep is a ``template`` (a DreamBoothJob spec) and ``axes``: each names a field of the
template and the values it takes. :func:`plan` turns it into child jobs and rows, purely:

* the cartesian product of the *training* axes (learning rates, prior preservation, ...)
  gives the child DreamBoothJobs, one per combination (a "run");
* ``training.steps`` is not trained once per value: a run trains to the largest value and
  checkpoints, samples and evaluates at every value (every gcd of the values);
* ``validation.scheduler`` is not trained either: each round of a run is sampled with every
  scheduler of the axis (``validation.compareSchedulers``), from the same weights.

So 2 learning rates x 2 steps x 2 schedulers are 2 child jobs and 8 rows; a row is
(a run's values, a step, a scheduler). :func:`validate_sweep` refuses a sweep with every
problem named by its field, as the generated CRD (:mod:`dreambooth.api.crd_sweep`) does.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, WithJsonSchema

from dreambooth.api.job import (
    FieldIssue,
    ObjectMeta,
    SpecError,
    _as_json,
    issues_from,
    validate_spec,
)
from dreambooth.api.resolve import effective_spec
from dreambooth.api.rules import violations
from dreambooth.api.spec import ApiModel, DreamBoothJobSpec

KIND = "DreamBoothSweep"
PLURAL = "dreamboothsweeps"
SINGULAR = "dreamboothsweep"
SHORT_NAMES = ["dbs"]

#: the most values an axis takes, axes a sweep has, runs it may allow, rows its status holds
MAX_VALUES = 16
MAX_AXES = 8
MAX_RUNS = 64
MAX_ROWS = 256
#: a child job is named ``<sweep>-<run number>``; the sweep's name leaves room for it
MAX_SWEEP_NAME = 56


class AxisField(StrEnum):
    """The template fields an axis may vary (wire paths below the job spec)."""

    LEARNING_RATE = "training.learningRate"
    TEXT_ENCODER_LEARNING_RATE = "training.textEncoderLearningRate"
    PRIOR = "prior.enabled"
    TRAIN_TEXT_ENCODER = "training.trainTextEncoder"
    METHOD = "training.method"
    LORA_RANK = "training.lora.rank"
    SEED = "training.seed"
    STEPS = "training.steps"
    SCHEDULER = "validation.scheduler"


#: axes that need no training of their own (steps: checkpoints; scheduler: sampling)
SAMPLING_AXES = frozenset({AxisField.STEPS, AxisField.SCHEDULER})
#: what each axis's values are on the wire (the CRD checks the same with CEL)
VALUE_TYPES: dict[AxisField, str] = {
    AxisField.LEARNING_RATE: "number",
    AxisField.TEXT_ENCODER_LEARNING_RATE: "number",
    AxisField.PRIOR: "boolean",
    AxisField.TRAIN_TEXT_ENCODER: "boolean",
    AxisField.METHOD: "string",
    AxisField.LORA_RANK: "integer",
    AxisField.SEED: "integer",
    AxisField.STEPS: "integer",
    AxisField.SCHEDULER: "string",
}
#: settings of a feature that an axis turns off (the rules refuse them without it)
_DROPPED_WHEN_OFF = {
    AxisField.PRIOR: ("prior", ("classPrompt", "numImages", "uri", "lossWeight")),
    AxisField.TRAIN_TEXT_ENCODER: ("training", ("textEncoderLearningRate", "textEncoderSteps")),
}

#: an axis value: any JSON scalar on the wire (the CRD keeps it as is); its field decides
AxisValue = Annotated[
    Any,
    WithJsonSchema(
        {
            "x-kubernetes-preserve-unknown-fields": True,
            "description": "A value of the field: a number, a boolean or a string.",
        }
    ),
]


class Axis(ApiModel):
    """One template field and the values the sweep tries."""

    field: AxisField = Field(
        description="The template field to vary: training.learningRate, "
        "training.textEncoderLearningRate, prior.enabled, training.trainTextEncoder, "
        "training.method, training.lora.rank, training.seed (each value trains a run), "
        "training.steps (one run trains to the largest value and is judged at each), "
        "validation.scheduler (the same checkpoints are sampled with each)."
    )
    values: list[AxisValue] = Field(
        min_length=1,
        max_length=MAX_VALUES,
        description="The values to try, each once, of the field's type (numbers for learning "
        "rates, true/false for prior.enabled and trainTextEncoder, integers for steps, seed and "
        "rank, names for method and scheduler).",
    )


class DreamBoothSweepSpec(ApiModel):
    """A study of one subject: the template trained with every combination of the axes."""

    template: DreamBoothJobSpec = Field(description="The DreamBoothJob spec every run starts from.")
    axes: list[Axis] = Field(
        min_length=1,
        max_length=MAX_AXES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["field"]},
        description="The fields to vary, each once. Runs: the product of the training axes' "
        "values; rows: runs x steps values x schedulers.",
    )
    max_parallel: int = Field(
        1, ge=1, le=MAX_RUNS, description="Runs not yet finished at once (a queue's quota: the others wait)."
    )
    max_runs: int = Field(
        16, ge=1, le=MAX_RUNS, description="The most runs the axes may make; a sweep making more is refused."
    )
    suspend: bool = Field(False, description="Suspend every run (set back to false to resume them).")


class DreamBoothSweep(ApiModel):
    api_version: Literal["dreambooth.io/v1alpha1"]
    kind: Literal["DreamBoothSweep"]
    metadata: ObjectMeta
    spec: DreamBoothSweepSpec
    status: dict[str, Any] | None = None


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One child job: its number (1-based) and the training axes' values."""

    number: int
    values: tuple[tuple[str, Any], ...]

    def label(self) -> str:
        return ", ".join(f"{_short(f)}={_shown(v)}" for f, v in self.values) or "template"


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a run's weights at a step, sampled with a scheduler."""

    run: int
    step: int
    scheduler: str


@dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    steps: tuple[int, ...]
    schedulers: tuple[str, ...]

    @property
    def rows(self) -> list[Row]:
        return [Row(r.number, s, k) for r in self.runs for s in self.steps for k in self.schedulers]

    @property
    def every(self) -> int:
        """Checkpoint and sample every this many steps: each steps value is a multiple."""
        return math.gcd(*self.steps)


def _short(field: str) -> str:
    """A field in a label: training.learningRate -> learningRate, prior.enabled stays."""
    return field.removeprefix("training.")


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _axis(spec: DreamBoothSweepSpec, field: AxisField) -> list[Any] | None:
    return next((list(a.values) for a in spec.axes if a.field is field), None)


def plan(spec: DreamBoothSweepSpec) -> Plan:
    """The runs (cartesian product of the training axes, in the axes' order) and the
    steps and schedulers each run is judged at. The spec must be valid."""
    eff = effective_spec(spec.template)
    training = [a for a in spec.axes if a.field not in SAMPLING_AXES]
    combos = itertools.product(*(a.values for a in training))
    runs = tuple(
        Run(i + 1, tuple((a.field.value, v) for a, v in zip(training, combo, strict=True)))
        for i, combo in enumerate(combos)
    )
    steps = tuple(sorted(_axis(spec, AxisField.STEPS) or [eff.training.steps]))
    schedulers = tuple(_axis(spec, AxisField.SCHEDULER) or [eff.validation.scheduler.value])
    return Plan(runs, steps, schedulers)


def run_count(spec: DreamBoothSweepSpec) -> int:
    return math.prod(len(a.values) for a in spec.axes if a.field not in SAMPLING_AXES)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[leaf] = value


def _with(doc: dict[str, Any], field: AxisField, value: Any) -> dict[str, Any]:
    """The template (wire dict) with ``field`` set to ``value``; turning a feature off
    drops its settings."""
    out = copy.deepcopy(doc)
    _set(out, field.value, value)
    if field in _DROPPED_WHEN_OFF and value is False:
        section, names = _DROPPED_WHEN_OFF[field]
        for name in names:
            out.get(section, {}).pop(name, None)
    return out


def child_spec(spec: DreamBoothSweepSpec, run: Run, the_plan: Plan) -> dict[str, Any]:
    """The spec of ``run``'s DreamBoothJob (wire dict): the template with the run's values,
    trained to the largest steps value, checkpointed and sampled at every steps value, each
    round sampled with every scheduler of the axis; never suspended by the template."""
    doc = spec.template.wire()
    for field, value in run.values:
        doc = _with(doc, AxisField(field), value)
    steps = _axis(spec, AxisField.STEPS)
    if steps:
        _set(doc, "training.steps", max(steps))
        every = the_plan.every
        if doc.get("checkpointing", {}).get("everySteps"):
            every = math.gcd(every, doc["checkpointing"]["everySteps"])
        _set(doc, "checkpointing.everySteps", every)
        # every checkpoint at a steps value stays until the end (the rows point at them)
        keep = max(doc.get("checkpointing", {}).get("keep", 3), max(steps) // every)
        _set(doc, "checkpointing.keep", min(keep, 100))
        if doc.get("validation", {}).get("enabled", True):
            _set(doc, "validation.everySteps", every)
    schedulers = _axis(spec, AxisField.SCHEDULER)
    if schedulers:
        _set(doc, "validation.scheduler", schedulers[0])
        if len(schedulers) > 1:
            _set(doc, "validation.compareSchedulers", schedulers[1:])
    _set(doc, "runPolicy.suspend", spec.suspend)
    return doc


# --- validation ----------------------------------------------------------------------------

_TYPE_WORDS = {"number": "a number", "boolean": "true or false", "integer": "an integer", "string": "a name"}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def sweep_violations(spec: DreamBoothSweepSpec, prefix: str = "spec") -> list[FieldIssue]:
    """Problems of a sweep whose fields each have the right shape (template included)."""
    issues: list[FieldIssue] = []
    eff = effective_spec(spec.template)
    template = spec.template.wire()
    seen: set[AxisField] = set()
    for i, axis in enumerate(spec.axes):
        where = f"{prefix}.axes[{i}]"
        if axis.field in seen:
            issues.append(
                FieldIssue(f"{where}.field", f"{axis.field.value} is an axis twice: list all its values in one axis")
            )
        seen.add(axis.field)
        kind = VALUE_TYPES[axis.field]
        shown_values: list[str] = []
        for j, value in enumerate(axis.values):
            at = f"{where}.values[{j}]"
            if not _type_ok(kind, value):
                issues.append(FieldIssue(at, f"{axis.field.value} takes {_TYPE_WORDS[kind]} (got {value!r})"))
                continue
            if repr(value) in shown_values:
                issues.append(FieldIssue(at, f"{value!r} is listed twice"))
                continue
            shown_values.append(repr(value))
            if axis.field is AxisField.STEPS:
                if value < 1 or value > eff.training.steps:
                    issues.append(
                        FieldIssue(
                            at,
                            f"{value} steps is outside 1..{eff.training.steps}, "
                            "the template's training.steps: raise the template's "
                            "steps or lower the value",
                        )
                    )
                continue
            issues.extend(_value_issues(template, axis.field, value, at))
    if AxisField.SCHEDULER in seen and not spec.template.validation.enabled:
        issues.append(
            FieldIssue(
                f"{prefix}.template.validation.enabled",
                "a validation.scheduler axis samples each round with each scheduler: validation must be enabled",
            )
        )
    runs = run_count(spec)
    if runs > spec.max_runs:
        issues.append(
            FieldIssue(
                f"{prefix}.axes",
                f"the training axes make {runs} runs, more than maxRuns {spec.max_runs}: drop values or raise maxRuns",
            )
        )
    rows = math.prod(len(a.values) for a in spec.axes)
    if rows > MAX_ROWS:
        issues.append(
            FieldIssue(
                f"{prefix}.axes",
                f"the axes make {rows} rows (runs x steps x schedulers), more than {MAX_ROWS}: drop values",
            )
        )
    return issues


def _value_issues(template: dict[str, Any], field: AxisField, value: Any, at: str) -> list[FieldIssue]:
    """What the job spec says of the template with ``field`` set to ``value``."""
    try:
        validate_spec(_with(template, field, value))
    except SpecError as err:
        out = []
        for issue in err.issues:
            path = issue.path.removeprefix("spec.")
            out.append(
                FieldIssue(
                    at,
                    f"{field.value}: {issue.message}"
                    if path == field.value
                    else f"with {field.value} {_shown(value)}: {path}: {issue.message}",
                )
            )
        return out
    return []


def validate_sweep(data: Any, *, cluster: bool = False) -> DreamBoothSweep:
    """Validate a whole DreamBoothSweep; raise :class:`SpecError` naming every bad field."""
    what = "DreamBoothSweep"
    if not isinstance(data, dict):
        raise SpecError(
            [FieldIssue("(document)", "must be a mapping with apiVersion, kind, metadata and spec")], what=what
        )
    try:
        sweep = DreamBoothSweep.model_validate_json(
            _as_json(data), strict=True, by_alias=True, by_name=False, context={"cluster": cluster, "skip_rules": True}
        )
    except ValidationError as err:
        raise SpecError(issues_from(err, DreamBoothSweep), what=what) from None
    issues = []
    if len(sweep.metadata.name) > MAX_SWEEP_NAME:
        issues.append(
            FieldIssue("metadata.name", f"at most {MAX_SWEEP_NAME} characters (its runs are named <sweep>-<number>)")
        )
    found = violations(sweep.spec.template)
    issues += [FieldIssue(f"spec.template.{v.path}", v.message) for v in found]
    if not found:
        issues += sweep_violations(sweep.spec)
    if issues:
        raise SpecError(issues, what=what)
    return sweep
