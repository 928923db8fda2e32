"""What a CustomResourceDefinition's schema makes an API server do with its objects: fill in
the schema's defaults and enforce its CEL validation rules (``x-kubernetes-validations``).

The emulator (:mod:`kubesim.emulator`) uses this on every create and update of a custom
resource whose CRD object it was given, as kube-apiserver does (1.29+, where validation
rules are GA): defaults first, then the rules, and a 422 ``Invalid`` with each broken
rule's message, the field it is on and its ``reason`` (kubectl prints them). The tests of
a CRD (tests/api/test_crd.py) evaluate its rules with the same code.

What the API server does and this does as well:

* rules run where their node is present, with ``self`` bound to the node's value, typed by
  its schema (an integer in a ``number`` field is a double, as in Kubernetes);
* transition rules (those that name ``oldSelf``) run only on update, and only where the
  node exists in the old object too; list items are matched to old ones by their keys in
  ``x-kubernetes-list-type: map`` lists (other lists' items have no old value), map values
  by key; ``optionalOldSelf`` is not supported;
* ``message`` (or ``failed rule: <rule>``), ``fieldPath`` and ``reason`` shape the error;
  an evaluation error is an error of the field, as there.

Not done: the structural schema itself (types, patterns, enums, ``required``, bounds),
pruning of unknown fields, ``messageExpression``, cost limits, CEL's compile-time type
checks, Kubernetes' CEL libraries beyond what cel-python has, validation ratcheting
(every write is validated whole: on a status write the unchanged spec passes again).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes

__all__ = ["Violation", "apply_defaults", "field_error_body", "violations", "walk_schema"]

_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}

#: ``reason`` of a rule -> how Kubernetes' field errors read (k8s.io/apimachinery field.Error)
_REASONS = {
    "FieldValueInvalid": "Invalid value",
    "FieldValueForbidden": "Forbidden",
    "FieldValueRequired": "Required value",
    "FieldValueDuplicate": "Duplicate value",
}


def program(rule: str) -> Any:
    """The compiled rule (cached; ``celpy.CELParseError`` on a syntax error)."""
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def walk_schema(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node below ``node`` (itself first) with a readable path:
    ``.spec.training``, ``.spec.resources.env[]``, ``.spec.resources.extraResources{}``."""
    yield path or "(root)", node
    for name, prop in (node.get("properties") or {}).items():
        yield from walk_schema(prop, f"{path}.{name}")
    if isinstance(node.get("items"), Mapping):
        yield from walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from walk_schema(node["additionalProperties"], f"{path}{{}}")


# ---------------------------------------------------------------------------------------------
# Defaults


def apply_defaults(obj: Any, schema: Mapping[str, Any]) -> Any:
    """``obj`` with the schema's defaults filled in where fields are missing, recursively (in
    objects, list items and map values), as the API server stores it. Never mutates ``obj``."""
    if isinstance(obj, Mapping):
        out = dict(obj)
        props = schema.get("properties") or {}
        for name, prop in props.items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(out[name], prop)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in out.keys() - props.keys():
                out[name] = apply_defaults(out[name], extra)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(item, schema["items"]) for item in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# CEL rules


@dataclass(frozen=True)
class Violation:
    """A rule that failed (``error`` is None) or could not be evaluated (``error``: what the
    evaluator said)."""

    field: str  # where the rule is (plus its fieldPath): "spec", "spec.resources.env[1]"
    rule: str
    message: str  # the rule's message, or the evaluation error's
    type: str  # the node's schema type ("object", "string", ...), which the error quotes
    reason: str = "FieldValueInvalid"
    error: str | None = None

    def body(self) -> str:
        """The error without its field, as in ``details.causes[].message``."""
        what = _REASONS.get(self.reason, "Invalid value")
        if what == "Duplicate value":
            return f'{what}: "{self.type}"'
        if what == "Invalid value":
            return f'{what}: "{self.type}": {self.message}'
        return f"{what}: {self.message}"

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()


def to_cel(value: Any, schema: Mapping[str, Any]) -> Any:
    """A JSON value as CEL sees it, typed by its schema node."""
    kind = schema.get("type")
    if value is None:
        return None
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(v, props.get(k) or (extra if isinstance(extra, Mapping) else {}))
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        items = schema.get("items")
        return celtypes.ListType([to_cel(v, items if isinstance(items, Mapping) else {}) for v in value])
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    return celpy.json_to_cel(value)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _old_items(new: list[Any], old: Any, schema: Mapping[str, Any]) -> list[Any]:
    """The old value of each new list item: by key in a map list, else none."""
    keys = schema.get("x-kubernetes-list-map-keys") or ()
    if schema.get("x-kubernetes-list-type") != "map" or not keys or not isinstance(old, list):
        return [None] * len(new)
    by_key = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, Mapping)}
    return [by_key.get(tuple(n.get(k) for k in keys)) if isinstance(n, Mapping) else None for n in new]


def violations(new: Any, schema: Mapping[str, Any], old: Any = None, path: str = "") -> list[Violation]:
    """The rules ``new`` breaks, node by node from ``schema`` down (``path`` is the node's
    field path); ``old``: the stored value on an update (None on create)."""
    found: list[Violation] = []
    if new is None:
        return found
    rules = schema.get("x-kubernetes-validations") or ()
    if rules:
        this, before = to_cel(new, schema), to_cel(old, schema)
        for rule in rules:
            text = rule["rule"]
            transition = "oldSelf" in text
            if transition and old is None:
                continue
            activation = {"self": this, **({"oldSelf": before} if transition else {})}
            where = (path + rule["fieldPath"]).lstrip(".") if rule.get("fieldPath") else path
            message = rule.get("message") or f"failed rule: {text}"
            kind = str(schema.get("type") or "object")
            try:
                result = program(text).evaluate(activation)
            except celpy.CELEvalError as exc:  # raised by some evaluations, returned by others
                result = exc
            if not isinstance(result, celtypes.BoolType):
                error = str(result.args[0] if getattr(result, "args", None) else result)
                found.append(Violation(where, text, f"{error} evaluating rule: {text}", kind, error=error))
            elif not result:
                found.append(Violation(where, text, message, kind, rule.get("reason") or "FieldValueInvalid"))
    if isinstance(new, Mapping):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for name, value in new.items():
            child = props.get(name) or (extra if isinstance(extra, Mapping) else None)
            if child is not None:
                previous = old.get(name) if isinstance(old, Mapping) else None
                found += violations(value, child, previous, _join(path, name))
    elif isinstance(new, list) and isinstance(schema.get("items"), Mapping):
        for i, (item, previous) in enumerate(zip(new, _old_items(new, old, schema), strict=True)):
            found += violations(item, schema["items"], previous, f"{path}[{i}]")
    return found


def field_error_body(found: list[Violation]) -> str:
    """What an API server's ``Invalid`` message says after ``<Kind> "<name>" is invalid: ``:
    one error as is, several as ``[a, b]`` (k8s.io/apimachinery's aggregate)."""
    errors = [str(v) for v in found]
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
