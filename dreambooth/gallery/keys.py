"""Which object keys of a job's output the gallery serves: a short list of exact shapes,
checked before any key reaches storage (no traversal, nothing outside the job's prefix)."""

from __future__ import annotations

import re

from dreambooth.api import layout

#: what the browser may fetch, relative to the job's output prefix
_SERVED = re.compile(
    r"^(samples/step-[0-9]{1,9}\.png"
    r"|samples/progression\.png"
    r"|history\.jsonl|evaluation\.jsonl|result\.json"
    r"|model\.safetensors"
    r"|lora/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.safetensors)$"
)

CONTENT_TYPES = {
    ".png": "image/png",
    ".jsonl": "application/x-ndjson",
    ".json": "application/json",
    ".safetensors": "application/octet-stream",
}


class KeyRefused(ValueError):
    """A key the gallery does not serve; the message says why."""


def served_key(key: str) -> str:
    """``key`` if the gallery serves it (relative to a job's prefix), else :class:`KeyRefused`."""
    if not key or len(key) > 256:
        raise KeyRefused("no such output")
    if ".." in key or "\\" in key or key.startswith("/") or "//" in key or "%" in key:
        raise KeyRefused("not a key inside the job's output")
    if not _SERVED.match(key):
        raise KeyRefused("not an output the gallery shows")
    return key


def content_type(key: str) -> str:
    return next((t for ext, t in CONTENT_TYPES.items() if key.endswith(ext)), "application/octet-stream")


def sample_key(step: int) -> str:
    return layout.sample_grid(step)
