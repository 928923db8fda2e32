"""Generate the DreamBoothJob CustomResourceDefinition from the typed models.

``dreambooth crd --write`` writes ``crds/dreamboothjobs.dreambooth.io.yaml`` (and the chart's
copy); a test fails when the committed files differ from what this module generates.

The pydantic JSON Schema is turned into a Kubernetes *structural* OpenAPI v3 schema: ``$ref``
inlined, ``Optional`` unwrapped, exclusive bounds in OpenAPI 3.0 form, object fields
defaulted to ``{}`` so the API server fills nested defaults, CEL rules attached.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from dreambooth.api.crd_rules import ITEMS, cel_rules
from dreambooth.api.job import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from dreambooth.api.spec import DreamBoothJobSpec
from dreambooth.api.status import DreamBoothJobStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"
HEADER = "# Generated from dreambooth/api by `make crds`. Do not edit by hand.\n"

_DROP = {"title", "additionalProperties"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Convert a pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        if "description" in node:
            target.pop("description", None)
        node = {**target, **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        inner = _structural(options[0], defs)
        if "description" in node:
            inner.pop("description", None)
        node = {**inner, **node}
        if node.get("default", "") is None:
            del node["default"]
        if isinstance(node.get("default"), dict) and node["default"]:
            node["default"] = {}
        # inner is structural already: its properties must not be converted twice
        return {
            k: v for k, v in node.items() if k not in _DROP or (k == "additionalProperties" and isinstance(v, dict))
        }
    for bound, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[base] = node[bound]
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if "patternProperties" in node:  # map keys with a pattern: no structural form, so the
        # CRD checks the values only and the models check the keys (e.g. nodeSelector)
        (values,) = node.pop("patternProperties").values()
        node["additionalProperties"] = values
    node.pop("propertyNames", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            required = set(node.get("required", []))
            props = {}
            for name, prop in value.items():
                converted = _structural(prop, defs)
                if (
                    converted.get("type") == "object"
                    and "default" not in converted
                    and name not in required
                    and not _is_optional(prop, defs)
                ):
                    converted["default"] = {}
                props[name] = converted
            out[key] = props
        elif key == "additionalProperties" or key == "items":
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    if out.get("type") == "object" and isinstance(out.get("default"), dict) and out["default"]:
        out["default"] = {}
    return out


def _is_optional(prop: dict[str, Any], defs: dict[str, Any]) -> bool:
    return any(o.get("type") == "null" for o in prop.get("anyOf", []))


def _attach_rules(schema: dict[str, Any]) -> None:
    for path, rules in cel_rules().items():
        node = schema
        for name in path:
            node = node["items"] if name == ITEMS else node["properties"][name]
        node["x-kubernetes-validations"] = rules


_KEY_ORDER = [
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "properties",
    "items",
    "additionalProperties",
]


def _tidy(node: Any) -> Any:
    """Keys in a reading order (type and description first), recursively."""
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    if not isinstance(node, dict):
        return node
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    out = {}
    for key in sorted(node, key=lambda k: rank.get(k, len(rank))):
        value = node[key]
        if key == "properties":  # property names keep the models' order
            out[key] = {name: _tidy(prop) for name, prop in value.items()}
        else:
            out[key] = _tidy(value)
    return out


def _schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _tidy(_structural(raw, defs))


def spec_schema() -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``spec`` (CEL rules included)."""
    schema = _schema_of(DreamBoothJobSpec)
    _attach_rules(schema)
    return schema


def status_schema() -> dict[str, Any]:
    schema = _schema_of(DreamBoothJobStatus)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def open_api_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A DreamBooth fine-tuning run of Stable Diffusion: a base model and a "
        "few photos of a subject become a model that can draw that subject.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "dreambooth.io/v1alpha1"},
            "kind": {"type": "string", "description": "DreamBoothJob"},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Family", "type": "string", "jsonPath": ".status.family", "priority": 1},
    {"name": "Checkpoint", "type": "string", "jsonPath": ".status.lastCheckpoint.uri", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".status.outputs.model", "priority": 1},
]


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "dreambooth-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


#: Where the generated CRD lives, relative to the repository root.
CRD_PATHS = [Path("crds") / CRD_FILE, Path("charts/dreambooth-operator/crds") / CRD_FILE]


def write(root: Path) -> list[Path]:
    """Write the CRD to every place it belongs below ``root`` (the chart only if it exists)."""
    text = render()
    written = []
    for rel in CRD_PATHS:
        path = root / rel
        if rel.parts[0] == "charts" and not (root / rel.parts[0] / rel.parts[1]).is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
