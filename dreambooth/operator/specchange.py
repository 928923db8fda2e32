"""Spec changes after a job started: which ones the running job ignores.

The trainer Job records the spec it was built from (:data:`SPEC_ANNOTATION`, the fields the
user set, as JSON). On a real API server the CRD's CEL rules refuse changes to anything but
``spec.runPolicy``; where they do not run (an older server, a test emulator), comparing
that record with the current spec tells the user which edits have no effect, in a status
condition. Pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dreambooth.api.spec import DreamBoothJobSpec

SPEC_ANNOTATION = "dreambooth.io/spec"
#: what a running job follows: suspend (mirrored onto the Job) and the ttl (read by the poller)
TAKES_EFFECT = frozenset({"spec.runPolicy.suspend", "spec.runPolicy.ttlSecondsAfterFinished"})


def spec_record(spec: DreamBoothJobSpec) -> str:
    """The annotation's value: the fields the user set (so that a newer operator with more
    defaults sees no change), compact JSON."""
    return json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
                      sort_keys=True, separators=(",", ":"))


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths of the leaves that differ between two specs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for key in sorted(set(old) | set(new), key=str)
                for p in changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")]
    if isinstance(old, dict) or isinstance(new, dict):
        return changed_paths(old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}, prefix)
    return [] if old == new else [prefix]


def ignored_changes(batch_job: Mapping[str, Any] | None, spec: DreamBoothJobSpec) -> tuple[str, ...]:
    """The paths of ``spec`` that differ from what the Job was built from, other than those
    that take effect. Empty when there is no Job or no record (a Job of an older operator)."""
    annotations = ((batch_job or {}).get("metadata") or {}).get("annotations") or {}
    record = annotations.get(SPEC_ANNOTATION)
    if not record:
        return ()
    try:
        accepted = json.loads(record)
    except ValueError:
        return ()
    current = json.loads(spec_record(spec))
    return tuple(p for p in changed_paths(accepted, current) if p not in TAKES_EFFECT)


def ignored_message(paths: tuple[str, ...]) -> str:
    return (f"changes to {', '.join(paths)} after the job was created are ignored: only "
            "spec.runPolicy.suspend and spec.runPolicy.ttlSecondsAfterFinished take effect on a "
            "running job; revert them, or delete and re-create the job")
