"""The one builder of the tests' DreamBoothJob documents: ``make_job(**changes)``.

Every test that needs a job document starts from the same minimal valid job (toy-cat in
team-a: a base model and the instance photos, nothing else) and says only what it changes:

    make_job(preset="object", training={"steps": 10})      # spec sections, by wire name
    make_job(metadata={"uid": UID}, output={"uri": OUT})     # metadata merges too
    make_job(instance={"prompt": DROP})                      # DROP removes a key
    make_job(CLUSTER_JOB, resources={"gpusPerNode": 2})      # a module's own starting point

Changes are deep-merged: a mapping merges key by key into what is there, any other value
(a list, a scalar) replaces it. The tables of tests/api name their changes by dotted path
instead (``{"spec.training.steps": 0}``): :func:`with_paths`.
"""

from __future__ import annotations

import copy
from typing import Any

#: a change that removes the key it is given for
DROP: Any = type("Drop", (), {"__repr__": lambda self: "DROP"})()

MINIMAL_JOB: dict[str, Any] = {
    "apiVersion": "dreambooth.io/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {"name": "toy-cat", "namespace": "team-a"},
    "spec": {
        "baseModel": {"uri": "s3://models/sd15/"},
        "instance": {"uri": "s3://training-data/toy-cat/", "prompt": "a photo of zwx toy cat"},
    },
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` deep-merged into it (``base`` is left alone)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_job(*bases: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The minimal valid DreamBoothJob with ``metadata=`` merged into its metadata and every
    other keyword (a spec field's wire name) into its spec; a fresh document every call.

    ``bases`` are changes of the same shape that a test module starts all its jobs from
    (e.g. ``{"metadata": {"uid": UID}, "preset": "object"}``), merged first, in order."""
    doc = MINIMAL_JOB
    for change in (*bases, changes):
        change = dict(change)
        doc = merged(doc, {"metadata": change.pop("metadata", {}), "spec": change})
    return copy.deepcopy(doc)


def with_paths(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with each dotted path of ``changes`` set to its value (DROP removes
    the key; missing parents are made)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return doc
