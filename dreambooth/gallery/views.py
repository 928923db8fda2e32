"""What the pages show of a job, from its DreamBoothJob object: pure functions.

A job object is the API's JSON (``metadata``, ``spec``, ``status``), from the cluster or made
up for a local run by :mod:`dreambooth.gallery.sources`. The jobs page reads the fields it
shows straight from the dict (1,000 jobs: no model validation per row); the job page
validates the spec with the API's own models to find the job's output prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dreambooth.api.status import Phase

PHASES = tuple(p.value for p in Phase)


@dataclass(frozen=True)
class JobRow:
    """One line of the jobs page."""

    namespace: str
    name: str
    phase: str
    percent: float
    summary: str
    loss: float | None
    eta_seconds: int | None
    family: str
    created: str | None
    kind: str = "DreamBoothJob"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def job_row(obj: dict[str, Any]) -> JobRow:
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    family = status.get("family") or _get(obj, "spec", "baseModel", "family") or "auto"
    percent = progress.get("percent")
    return JobRow(
        namespace=_get(obj, "metadata", "namespace") or "default",
        name=_get(obj, "metadata", "name") or "?",
        phase=status.get("phase") or Phase.PENDING.value,
        percent=float(percent) if isinstance(percent, int | float) else 0.0,
        summary=progress.get("summary") or "",
        loss=progress.get("loss") if isinstance(progress.get("loss"), int | float) else None,
        eta_seconds=progress.get("etaSeconds") if isinstance(progress.get("etaSeconds"), int) else None,
        family=str(family),
        created=_get(obj, "metadata", "creationTimestamp"),
        kind=obj.get("kind") or "DreamBoothJob",
    )


@dataclass(frozen=True)
class Filter:
    """The jobs page's filter: empty strings match everything."""

    namespace: str = ""
    phase: str = ""

    def matches(self, row: JobRow) -> bool:
        return (not self.namespace or row.namespace == self.namespace) and (not self.phase or row.phase == self.phase)


def job_rows(objects: list[dict[str, Any]], only: Filter = Filter()) -> list[JobRow]:
    """The rows of the jobs page: filtered, newest first (then by name)."""
    rows = [job_row(o) for o in objects]
    rows = [r for r in rows if only.matches(r)]
    rows.sort(key=lambda r: (r.namespace, r.name))
    rows.sort(key=lambda r: r.created or "", reverse=True)
    return rows


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def duration(seconds: float | None) -> str:
    """``45s``, ``3m 20s``, ``2h 05m``, ``3d 4h``; ``""`` for None."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def age(created: str | None, now: datetime | None = None) -> str:
    when = parse_time(created)
    if when is None:
        return ""
    return duration(((now or datetime.now(UTC)) - when).total_seconds())


def loss_text(loss: float | None) -> str:
    return "" if loss is None else f"{loss:.4f}"


# --- conditions in words ----------------------------------------------------------------

#: what a condition that holds means, in words
_HOLDS = {
    "Ready": "ready",
    "Running": "running",
    "Succeeded": "finished successfully",
    "Failed": "failed",
    "Suspended": "suspended",
    "Stalled": "stalled: its step has not moved",
    "Overfitting": "overfitting",
    "Underfitting": "underfitting",
}


@dataclass(frozen=True)
class ConditionLine:
    type: str
    holds: bool | None
    sentence: str
    reason: str
    message: str
    since: str | None


def condition_lines(status: dict[str, Any]) -> list[ConditionLine]:
    """The status's conditions as sentences, those that hold first."""
    lines = []
    for cond in status.get("conditions") or []:
        kind, value = str(cond.get("type", "?")), cond.get("status")
        holds = {"True": True, "False": False}.get(value)
        what = _HOLDS.get(kind, kind)
        sentence = {True: f"The job is {what}", False: f"The job is not {what}"}.get(holds, f"{kind}: unknown")
        reason = str(cond.get("reason") or "")
        lines.append(
            ConditionLine(
                kind,
                holds,
                sentence + (f" ({reason})" if reason else "") + ".",
                reason,
                str(cond.get("message") or ""),
                cond.get("lastTransitionTime"),
            )
        )
    lines.sort(key=lambda c: (c.holds is not True,))
    return lines


@dataclass
class Facts:
    """The headline numbers of a job page."""

    phase: str
    percent: float
    summary: str
    loss: str
    lr: str
    eta: str
    family: str
    age: str
    restarts: int
    extra: dict[str, str] = field(default_factory=dict)


def facts(obj: dict[str, Any], now: datetime | None = None) -> Facts:
    row = job_row(obj)
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    lr = progress.get("learningRate")
    return Facts(
        phase=row.phase,
        percent=row.percent,
        summary=row.summary,
        loss=loss_text(row.loss),
        lr=f"{lr:.3g}" if isinstance(lr, int | float) else "",
        eta=duration(row.eta_seconds),
        family=row.family,
        age=age(row.created, now),
        restarts=int(status.get("restarts") or 0),
    )
