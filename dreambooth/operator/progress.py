"""Training progress from rank 0's metrics endpoint: scrape, parse, fold into ``Progress``.

The operator reads the trainer's ``/metrics`` (the names of :mod:`dreambooth.api.telemetry`)
about every 10 s while the trainer runs. Reading is best effort: :func:`scrape` never raises
on network trouble, it returns ``None`` and the status keeps the last progress. Everything
but :func:`scrape` is pure.

The trainer's gauges start at 0 in every new process, so a 0 means "not measured yet" (a
pod that has just restarted reports step 0 until it has resumed and done a step): such
values never overwrite what the status already shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dreambooth.api import telemetry as names
from dreambooth.api.status import Evaluation, Progress, Timestamp, progress_summary
from dreambooth.operator import naming

log = logging.getLogger(__name__)

#: how long one scrape may take; the poll interval is ~10 s
DEFAULT_SCRAPE_TIMEOUT = 3.0
#: annotation (and label) the Job controller puts on the pods of an Indexed Job


@dataclass(frozen=True)
class TrainerSnapshot:
    """What rank 0's metrics said at one moment. ``None``: not exported (yet)."""

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    images_per_second: float | None = None
    last_checkpoint_step: int | None = None
    #: one of :data:`dreambooth.api.telemetry.TRAINER_PHASES`
    phase: str | None = None
    #: the base model's family, once the trainer has opened the model (sd, sdxl)
    family: str | None = None
    #: the latest evaluated sample round (spec.evaluation; its bestCheckpoint's URI unset)
    evaluation: Evaluation | None = None
    #: the step of the best evaluated checkpoint so far
    best_step: int | None = None


# --- time ------------------------------------------------------------------------------


def rfc3339(when: datetime) -> Timestamp:
    """``2026-11-24T10:00:00Z`` (seconds, UTC), as Kubernetes writes times."""
    if when.tzinfo is None:
        raise ValueError("naive datetime: pass an aware one, e.g. datetime.now(UTC)")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- parsing ---------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def parse_metrics(text: str) -> TrainerSnapshot | None:
    """The trainer's metrics in ``text`` (Prometheus text format), or ``None`` when the
    text does not parse or holds none of them. Metrics that are missing stay ``None``."""
    gauges: dict[str, float] = {}
    phase: str | None = None
    model_family: str | None = None
    found = False
    try:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(names.PREFIX):
                continue
            found = True
            for sample in family.samples:
                if family.name == names.PHASE and sample.name == names.PHASE:
                    # an Enum: one sample per state, labelled with the metric's own name
                    if sample.value == 1 and sample.labels.get(names.PHASE) in names.TRAINER_PHASES:
                        phase = sample.labels[names.PHASE]
                elif family.name in (names.MODEL, names.MODEL + "_info") and sample.value == 1:
                    model_family = sample.labels.get(names.MODEL_FAMILY_LABEL) or model_family
                elif sample.name == family.name and not sample.labels:
                    gauges[sample.name] = sample.value
    except Exception as err:  # noqa: BLE001 - the parser raises ValueError, IndexError, ...
        log.debug("unparseable metrics: %s", err)
        return None
    if not found:
        return None

    def value(name: str) -> float | None:
        got = gauges.get(name)
        return None if got is None else _finite(got)

    def positive(name: str) -> float | None:
        got = value(name)
        return got if got is not None and got > 0 else None

    step = value(names.STEP)
    total = positive(names.TOTAL_STEPS)
    evaluation, best = _evaluation(value)
    checkpoint = positive(names.LAST_CHECKPOINT_STEP)
    measured = bool(step and step > 0)  # loss and LR are 0 until the first step is done
    return TrainerSnapshot(
        step=int(step) if step and step > 0 else 0,
        total_steps=int(total) if total else None,
        loss=value(names.LOSS) if measured else None,
        learning_rate=value(names.LEARNING_RATE) if measured else None,
        images_per_second=positive(names.IMAGES_PER_SECOND),
        last_checkpoint_step=int(checkpoint) if checkpoint else None,
        phase=phase,
        family=model_family,
        evaluation=evaluation,
        best_step=best,
    )


def _evaluation(value) -> tuple[Evaluation | None, int | None]:
    """The evaluation gauges (NaN, i.e. None, until the first round after the base model's)."""
    step, subject, memorization = (
        value(n) for n in (names.EVALUATION_STEP, names.SUBJECT_FIDELITY, names.MEMORIZATION)
    )
    if step is None or subject is None or memorization is None or step < 1:
        return None, None
    best = value(names.BEST_CHECKPOINT_STEP)
    return Evaluation(
        step=int(step),
        subject_fidelity=subject,
        memorization=memorization,
        prompt_fidelity=value(names.PROMPT_FIDELITY),
        sample_similarity=value(names.SAMPLE_SIMILARITY),
        prior_loss_drift=value(names.PRIOR_LOSS_DRIFT),
        score=value(names.EVALUATION_SCORE),
        base_subject_fidelity=value(names.BASE_SUBJECT_FIDELITY),
    ), int(best) if best is not None and best >= 1 else None


# --- scraping --------------------------------------------------------------------------


def rank0_pod(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The running pod of completion index 0 (the one serving metrics), if any."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        index = (meta.get("annotations") or {}).get(naming.COMPLETION_INDEX_ANNOTATION) or (
            meta.get("labels") or {}
        ).get(naming.COMPLETION_INDEX_ANNOTATION)
        status = pod.get("status") or {}
        if (
            index in (None, "0")
            and status.get("phase") == "Running"
            and status.get("podIP")
            and not meta.get("deletionTimestamp")
        ):
            return pod
    return None


def metrics_url(pod: Mapping[str, Any], port: int) -> str | None:
    """``http://<pod IP>:<port>/metrics`` of ``pod``, or ``None`` before it has an IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


async def scrape(
    url: str,
    timeout: float = DEFAULT_SCRAPE_TIMEOUT,
    *,
    session: aiohttp.ClientSession | None = None,
) -> TrainerSnapshot | None:
    """GET ``url`` and parse it; ``None`` on any network error, timeout, non-200 answer or
    unparseable body. Never raises for those: an unreachable trainer never fails a job."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        if session is None:
            async with aiohttp.ClientSession(timeout=client_timeout) as own:
                return await _get(own, url, client_timeout)
        return await _get(session, url, client_timeout)
    except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError, ValueError) as err:
        log.debug("scrape %s failed: %r", url, err)
        return None


async def _get(session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout):
    async with session.get(url, timeout=timeout) as response:
        if response.status != 200:
            log.debug("scrape %s: HTTP %d", url, response.status)
            return None
        return parse_metrics(await response.text())


# --- folding a snapshot into the status --------------------------------------------------


def progress_from(
    snapshot: TrainerSnapshot | None,
    previous: Progress | None,
    now: datetime,
    images_per_step: int,
    total_steps: int = 0,
) -> Progress | None:
    """The status's progress after reading ``snapshot`` at ``now``.

    ``snapshot`` None (unreachable endpoint): ``previous`` unchanged. ``total_steps`` (the
    spec's) is used until the trainer exports its own. ETA: remaining steps x images per
    step / images per second. ``stepChangedAt`` moves only when the step does.
    """
    if snapshot is None:
        return previous
    total = snapshot.total_steps or total_steps or (previous.total_steps if previous else 0)
    if snapshot.step > 0:
        step, loss, lr = snapshot.step, snapshot.loss, snapshot.learning_rate
    elif previous is not None:  # a fresh process: nothing measured yet, keep what we showed
        step, loss, lr = previous.step, previous.loss, previous.learning_rate
    else:
        step, loss, lr = 0, None, None
    ips = snapshot.images_per_second
    if total and step >= total:
        eta: int | None = 0
    elif total and ips and images_per_step > 0:
        eta = math.ceil((total - step) * images_per_step / ips)
    else:
        eta = None
    stamp = rfc3339(now)
    changed = previous is None or previous.step != step or previous.step_changed_at is None
    percent, summary = progress_summary(step, total)
    return Progress(
        step=step,
        total_steps=total,
        percent=percent,
        summary=summary,
        loss=loss,
        learning_rate=lr if lr is None or lr >= 0 else None,
        images_per_second=ips,
        eta_seconds=eta,
        updated_at=stamp,
        step_changed_at=stamp if changed else previous.step_changed_at,
    )


def stalled_for(progress: Progress | None, now: datetime) -> timedelta | None:
    """How long the step has not moved (``None``: unknown)."""
    since = parse_time(progress.step_changed_at) if progress else None
    return None if since is None else max(timedelta(0), now - since)


def is_stalled(progress: Progress | None, now: datetime, timeout: timedelta) -> bool:
    """True when ``progress`` (as :func:`progress_from` returned it: ``stepChangedAt`` is
    when the step last moved) has not moved for ``timeout`` or longer. Also true when the
    endpoint has been unreachable that long: no step was seen to move."""
    idle = stalled_for(progress, now)
    return idle is not None and idle >= timeout


def format_duration(seconds: float) -> str:
    """``1h02m``, ``5m03s``, ``42s``: for condition messages."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
