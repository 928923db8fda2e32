"""What each generation of a DreamBoothJob means to the operator, worked out once. Pure.

A poll cycle looks at every job every poll interval; validating a body into the typed
job (``validate_job``, which resolves the effective spec for its cross-field rules) and
resolving its effective spec again for the status took ~0.2 ms per job and cycle, for a
spec that changes only when ``metadata.generation`` does. :class:`TypedJobs` keeps the
result per (uid, generation): an invalid generation's issues as well, so that it is
validated once and reported from the cached issues.

Labels are not part of the generation (the API server does not count metadata edits) but
the typed job carries them (the trainer Job's Kueue labels come from them): an entry
built from other labels than the body's is built again.

The rest are the pure steps between the typed job and the API calls: the previous status
of a body, the :class:`~dreambooth.operator.verdict.Observation` a status is computed from,
and what a trainer Job created now is built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dreambooth.api import SpecError, effective_spec, validate_job
from dreambooth.api.config import output_uri_for
from dreambooth.api.job import DreamBoothJob
from dreambooth.api.spec import DreamBoothJobSpec
from dreambooth.api.status import DreamBoothJobStatus
from dreambooth.operator import trainerinputs
from dreambooth.operator.pods import of_job
from dreambooth.operator.progress import TrainerSnapshot, parse_time
from dreambooth.operator.settings import OperatorSettings
from dreambooth.operator.verdict import Observation


@dataclass(frozen=True)
class TypedJob:
    """A valid generation: the typed job, its effective spec (presets and defaults filled
    in) and where its outputs go."""

    job: DreamBoothJob
    effective: DreamBoothJobSpec
    output_uri: str

    @property
    def generation(self) -> int:
        return self.job.metadata.generation or 0


@dataclass(frozen=True)
class InvalidJob:
    """A generation that cannot run: every issue, as ``path: what to fix``."""

    issues: tuple[str, ...]
    generation: int


@dataclass
class _Entry:
    generation: int
    labels: dict[str, str]
    typed: TypedJob | InvalidJob


def cache_key(body: Mapping[str, Any]) -> str:
    """The job's uid (what the API server gives it; a job re-created under the same name
    has another), else its namespace/name."""
    meta = body["metadata"]
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


def typed_job(body: Mapping[str, Any], settings: OperatorSettings) -> TypedJob | InvalidJob:
    """Validate a DreamBoothJob as read from the API (``cluster=True``: no file:// URIs)."""
    meta = body["metadata"]
    try:
        job = validate_job(
            {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "metadata": dict(meta),
                "spec": dict(body.get("spec") or {}),
            },
            cluster=True,
        )
    except SpecError as err:
        return InvalidJob(tuple(str(i) for i in err.issues), meta.get("generation", 0))
    return TypedJob(job, effective_spec(job.spec), output_uri_for(job, settings.defaults()))


@dataclass
class TypedJobs:
    """The typed job of each DreamBoothJob's current generation (:func:`typed_job`),
    computed on the first look at a generation and kept until the next one (or until
    :meth:`forget`). ``built`` counts the validations (the tests read it)."""

    settings: OperatorSettings
    entries: dict[str, _Entry] = field(default_factory=dict)
    built: int = 0

    def of(self, body: Mapping[str, Any]) -> TypedJob | InvalidJob:
        meta = body["metadata"]
        key, generation, labels = cache_key(body), meta.get("generation", 0), meta.get("labels") or {}
        entry = self.entries.get(key)
        if entry is None or entry.generation != generation or entry.labels != labels:
            entry = _Entry(generation, dict(labels), typed_job(body, self.settings))
            self.entries[key] = entry
            self.built += 1
        return entry.typed

    def forget(self, body: Mapping[str, Any]) -> None:
        self.entries.pop(cache_key(body), None)

    def __len__(self) -> int:
        return len(self.entries)


def previous_status(body: Mapping[str, Any]) -> DreamBoothJobStatus | None:
    """The status the job has now; None without one, or when it is not ours to read
    (someone else wrote garbage: it is rewritten whole)."""
    status = body.get("status")
    try:
        return DreamBoothJobStatus.model_validate(status) if status else None
    except ValueError:
        return None


def observation(
    typed: TypedJob,
    settings: OperatorSettings,
    batch_job: dict[str, Any] | None,
    pods: Sequence[dict[str, Any]],
    snapshot: TrainerSnapshot | None,
) -> Observation:
    """What the phase machine computes a status from. With a Job: its own pods (an earlier
    attempt's may still be going)."""
    return Observation.of(
        typed.effective,
        generation=typed.generation,
        output_uri=typed.output_uri,
        job=batch_job,
        pods=of_job(batch_job, pods),
        snapshot=snapshot,
        stall_timeout=timedelta(seconds=settings.stall_timeout_seconds),
        name=typed.job.metadata.name,
    )


def trainer_inputs(
    typed: TypedJob, settings: OperatorSettings, previous: DreamBoothJobStatus | None, now: datetime
) -> trainerinputs.TrainerInputs:
    """What a Job created now is built from: the restarts counted so far, and the seconds
    since the job first started (its activeDeadlineSeconds counts from then)."""
    started = parse_time(previous.start_time) if previous else None
    elapsed = int((now - started).total_seconds()) if started else 0
    return trainerinputs.TrainerInputs(
        typed.job, settings, restarts=previous.restarts if previous else 0, elapsed_seconds=elapsed
    )
