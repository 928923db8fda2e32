"""The DreamBoothJob resource and its validation with messages that say what to fix."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from dreambooth.api import k8s_names
from dreambooth.api.redact import shown
from dreambooth.api.rules import violations
from dreambooth.api.spec import ApiModel, DreamBoothJobSpec, LabelKey, LabelValue
from dreambooth.api.status import DreamBoothJobStatus

GROUP = "dreambooth.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DreamBoothJob"
PLURAL = "dreamboothjobs"
SINGULAR = "dreambooth" + "job"
SHORT_NAMES = ["dbj"]
CATEGORIES = ["all", "dreambooth"]


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta we read; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=k8s_names.DNS_LABEL_MAX, pattern=k8s_names.anchored(k8s_names.DNS_LABEL))
    namespace: str | None = Field(
        None, min_length=1, max_length=k8s_names.DNS_LABEL_MAX, pattern=k8s_names.anchored(k8s_names.DNS_LABEL)
    )
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class DreamBoothJob(ApiModel):
    api_version: Literal["dreambooth.io/v1alpha1"]
    kind: Literal["DreamBoothJob"]
    metadata: ObjectMeta
    spec: DreamBoothJobSpec
    status: DreamBoothJobStatus | None = None


@dataclass(frozen=True)
class FieldIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """An invalid job: every issue names a field and says what is allowed."""

    def __init__(self, issues: list[FieldIssue], *, what: str = "DreamBoothJob") -> None:
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"invalid {what} ({len(issues)} problem(s)):\n{lines}")


#: pydantic error types of a string or enum field given something else
_STRING_ERRORS = frozenset({"string_type", "enum", "literal_error", "str_type"})


#: what to do, for errors whose pydantic message says only what is wrong
_HINTS = {
    ("lora", "targetModules"): "LoRA would train nothing; name the modules that get adapters, "
    "e.g. [to_q, to_k, to_v, to_out.0] (the default when targetModules is left out)",
}
#: pydantic's last location part for a bad dict key
_KEY = "[key]"
_PART_MAX = 64


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == _KEY:
            continue
        if isinstance(part, str) and len(part) > _PART_MAX:  # a huge map key
            part = f"{part[: _PART_MAX - 24]}...({len(part)} characters)"
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Wire names of the fields of the model found at ``loc`` below ``model``."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        model = inner
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def issues_from(err: ValidationError, root: type[BaseModel], prefix: str = "") -> list[FieldIssue]:
    """Turn pydantic's errors into :class:`FieldIssue` s with wire paths."""
    issues = []
    for e in err.errors():
        loc = tuple(e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "cross_field":
            loc = loc + tuple(e["ctx"]["path"].split("."))
            message = e["ctx"]["message"]
        elif e["type"] == "missing":
            message = "required"
        elif tuple(loc[-2:]) in _HINTS:
            message = f"{message}: {_HINTS[tuple(loc[-2:])]}"
        elif e["type"] == "string_pattern_mismatch" and k8s_names.words(e["ctx"]["pattern"]):
            message = f"{k8s_names.words(e['ctx']['pattern'])} (got {shown(e['input'])})"
            if loc and loc[-1] == _KEY:
                message = f"the key: {message}"
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_fields(root, loc[:-1])
            camel = to_camel(str(loc[-1])) if loc else ""
            if allowed and camel in allowed and camel != loc[-1]:
                message = f"unknown field: the CRD's names are camelCase, use {camel}"
            else:
                message = "unknown field (check the spelling)"
                if allowed:
                    message += "; allowed here: " + ", ".join(allowed)
        elif isinstance(e.get("input"), bool) and e["type"] in _STRING_ERRORS:
            word = "yes/on/true" if e["input"] else "no/off/false"
            message += (
                f" (got {str(e['input']).lower()}: YAML reads an unquoted {word} as a boolean; "
                "quote the value, e.g. 'no')"
            )
        elif isinstance(e.get("input"), str | int | float | bool) and e["type"] != "value_error":
            message += f" (got {shown(e['input'])})"
        path = _path(loc)
        issues.append(FieldIssue(f"{prefix}.{path}" if prefix and path else prefix or path, message))
    return issues


def _as_json(data: Any) -> str:
    """The document as the API server sees it: JSON. Validated strictly, as the CRD's
    schema is: ``steps: "400"`` is a string, not a number (YAML dates become strings), and
    only the CRD's camelCase names are fields (``learning_rate`` is an unknown field)."""
    return json.dumps(data, default=str)


def validate_spec(data: Any, *, cluster: bool = False, prefix: str = "spec") -> DreamBoothJobSpec:
    """Validate a spec; raise :class:`SpecError` with every problem found.

    ``cluster=True`` checks it for a Kubernetes cluster (no file:// URIs).
    """
    try:
        spec = DreamBoothJobSpec.model_validate_json(
            _as_json(data),
            strict=True,
            by_alias=True,
            by_name=False,
            context={"cluster": cluster, "skip_rules": True},
        )
    except ValidationError as err:
        raise SpecError(issues_from(err, DreamBoothJobSpec, prefix)) from None
    found = violations(spec)
    if found:
        raise SpecError([FieldIssue(f"{prefix}.{v.path}", v.message) for v in found])
    return spec


def validate_job(data: Any, *, cluster: bool = False) -> DreamBoothJob:
    """Validate a whole DreamBoothJob object (as read from YAML or the API)."""
    if not isinstance(data, dict):
        raise SpecError([FieldIssue("(document)", "must be a mapping with apiVersion, kind, metadata and spec")])
    try:
        job = DreamBoothJob.model_validate_json(
            _as_json(data), strict=True, by_alias=True, by_name=False, context={"cluster": cluster, "skip_rules": True}
        )
    except ValidationError as err:
        raise SpecError(issues_from(err, DreamBoothJob)) from None
    found = violations(job.spec)
    if found:
        raise SpecError([FieldIssue(f"spec.{v.path}", v.message) for v in found])
    return job
