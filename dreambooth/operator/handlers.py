"""kopf handlers: thin. Validate the body into the typed job, build the children with pure
functions, ensure they exist, observe Job + pods + rank 0's metrics, and write the whole
status once per pass. The operator is the only writer of ``.status``.

    kopf run --standalone --all-namespaces -m dreambooth.operator   (or: dreambooth-operator)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import kopf

from dreambooth.api import SpecError, effective_spec, validate_job
from dreambooth.api.config import output_uri_for
from dreambooth.api.job import GROUP, PLURAL, VERSION, DreamBoothJob
from dreambooth.api.status import DreamBoothJobStatus, Phase
from dreambooth.operator import naming, resources
from dreambooth.operator.kube import Kube
from dreambooth.operator.metrics import OperatorMetrics
from dreambooth.operator.observed import NamespaceView
from dreambooth.operator.progress import metrics_url, parse_time, rank0_pod, scrape
from dreambooth.operator.settings import OperatorSettings, SettingsError
from dreambooth.operator.status import (
    Observation,
    compute_status,
    invalid_spec_status,
    transition_events,
)

log = logging.getLogger("dreambooth.operator")

#: read once, when kopf imports the handlers; an invalid setting stops the operator at
#: startup with a message naming it (importing this module never fails on one)
try:
    SETTINGS, SETTINGS_ERROR = OperatorSettings.from_env(), None
except SettingsError as _err:
    SETTINGS, SETTINGS_ERROR = OperatorSettings(), _err
RESOURCE = (GROUP, VERSION, PLURAL)
ANNOTATION_PREFIX = "dreambooth.io"


@kopf.index(*RESOURCE)
def dreambooth_jobs(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
    """Every DreamBoothJob the operator sees, as a plain copy, for the poller."""
    return {(namespace, name): copy.deepcopy(dict(body))}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, dreambooth_jobs: kopf.Index,
                  **_: Any) -> None:
    if SETTINGS_ERROR is not None:
        raise kopf.PermanentError(str(SETTINGS_ERROR))
    # kopf keeps its own bookkeeping in annotations, never in .status (ours alone)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # only warnings of kopf itself become Events
    memo.kube = await Kube.connect()
    memo.http = aiohttp.ClientSession()
    memo.metrics = OperatorMetrics()
    if SETTINGS.metrics_port:
        memo.metrics.serve(SETTINGS.metrics_port)
    memo.poller = asyncio.create_task(poll_forever(dreambooth_jobs, memo))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.poller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.poller
    await memo.http.close()
    await memo.kube.close()


def _previous(status: dict[str, Any] | None) -> DreamBoothJobStatus | None:
    try:
        return DreamBoothJobStatus.model_validate(status) if status else None
    except ValueError:  # someone else wrote garbage: we rewrite it whole
        return None


def _typed(body: kopf.Body) -> DreamBoothJob:
    return validate_job(
        {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body["metadata"]),
         "spec": dict(body.get("spec") or {})},
        cluster=True,
    )


async def _write(patch: kopf.Patch, body: kopf.Body, memo: kopf.Memo, previous: DreamBoothJobStatus | None,
                 status: DreamBoothJobStatus, obs: Observation | None = None) -> None:
    """The whole status in one patch (nulls clear fields), plus the Events it implies."""
    new = status.model_dump(mode="json", by_alias=True)
    old = previous.model_dump(mode="json", by_alias=True) if previous else None
    if new != old:
        patch["status"] = new
    await _announce(body, memo, previous, status, obs)


async def _announce(body: Any, memo: kopf.Memo, previous: DreamBoothJobStatus | None,
                    status: DreamBoothJobStatus, obs: Observation | None) -> None:
    """The Events a status change implies, and the jobs-by-phase metric."""
    for event in transition_events(previous, status, obs):
        await memo.kube.post_event(dict(body), event.type, event.reason, event.message)
    memo.metrics.entered(previous.phase if previous else None, status.phase)
    memo.metrics.jobs.set(body["metadata"]["namespace"], body["metadata"]["name"], status.phase)


async def observe(job: DreamBoothJob, previous: DreamBoothJobStatus | None, memo: kopf.Memo,
                  view: NamespaceView | None = None) -> tuple[DreamBoothJobStatus, Observation]:
    """The Job and its pods (from the poll cycle's ``view``, else read now), rank 0's
    metrics; the status computed from them (pure)."""
    meta, kube = job.metadata, memo.kube
    if view is not None:
        batch_job, pods = view.trainer_job(meta.name), view.trainer_pods(meta.name)
    else:
        batch_job = await kube.job(meta.namespace, naming.trainer_name(meta.name))
        pods = await kube.pods(meta.namespace, naming.selector(meta.name)) if batch_job else []
    snapshot = None
    pod = rank0_pod(pods)
    if pod is not None and (pod.get("status") or {}).get("phase") == "Running":
        url = metrics_url(pod, SETTINGS.trainer_metrics_port)
        if url:
            snapshot = await scrape(url, session=memo.http)
    return _status(job, previous, batch_job, pods, snapshot)


def _status(job: DreamBoothJob, previous: DreamBoothJobStatus | None, batch_job: dict[str, Any] | None,
            pods: list[dict[str, Any]], snapshot: Any) -> tuple[DreamBoothJobStatus, Observation]:
    obs = Observation.of(
        effective_spec(job.spec), generation=job.metadata.generation or 0,
        output_uri=output_uri_for(job, SETTINGS.defaults()), job=batch_job, pods=pods,
        snapshot=snapshot, stall_timeout=timedelta(seconds=SETTINGS.stall_timeout_seconds),
    )
    return compute_status(obs, previous, datetime.now(UTC)), obs


async def _sync_suspend(job: DreamBoothJob, batch_job: dict[str, Any] | None, memo: kopf.Memo) -> None:
    """spec.runPolicy.suspend drives the Job's suspend. Under Kueue (a queue label on the
    job) Kueue alone suspends and admits the Job, so the operator stays out of it."""
    if naming.QUEUE_LABEL in job.metadata.labels:
        return
    wanted = job.spec.run_policy.suspend
    if batch_job is not None and bool((batch_job.get("spec") or {}).get("suspend")) != wanted:
        await memo.kube.suspend_job(job.metadata.namespace, naming.trainer_name(job.metadata.name), wanted)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
async def reconcile(body: kopf.Body, status: dict, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Create (idempotently) the ConfigMap, headless Service and Indexed Job of a job."""
    started = time.perf_counter()
    previous = _previous(status)
    try:
        job = _typed(body)
    except SpecError as err:
        issues = [str(issue) for issue in err.issues]
        now = datetime.now(UTC)
        await _write(patch, body, memo, previous, invalid_spec_status(issues, body["metadata"].get("generation", 0),
                                                                now, previous))
        return  # permanent until the spec changes: no retry loop
    if previous is not None and previous.phase.finished:
        memo.metrics.jobs.set(body["metadata"]["namespace"], body["metadata"]["name"], previous.phase)
        return  # a finished job is never re-run (its Job may be gone: ttl)
    inputs = resources.TrainerInputs(job, SETTINGS)
    try:
        # owned by the job (deleting it deletes them); the Job last: its pods mount the rest
        *first, trainer = resources.children(inputs)
        await asyncio.gather(*(memo.kube.ensure(child) for child in first))
        created = await memo.kube.ensure(trainer)
        if created is not None:  # a new Job has no pods yet: nothing else to read
            current, obs = _status(job, previous, created, [], None)
        else:
            current, obs = await observe(job, previous, memo)
            await _sync_suspend(job, obs.job, memo)
    except Exception:
        memo.metrics.errors.labels("reconcile").inc()
        raise  # kopf retries with backoff
    await _write(patch, body, memo, previous, current, obs)
    memo.metrics.reconcile_seconds.labels("reconcile").observe(time.perf_counter() - started)


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths of the leaves that differ between two specs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for key in sorted(set(old) | set(new), key=str)
                for p in changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")]
    if isinstance(old, dict) or isinstance(new, dict):
        return changed_paths(old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}, prefix)
    return [] if old == new else [prefix]


@kopf.on.update(*RESOURCE, field="spec")
async def spec_changed(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """Only runPolicy.suspend may change once a job exists (the CRD's CEL rules refuse the
    rest on a real API server; this says so if something slipped through)."""
    ignored = [p for p in changed_paths(old or {}, new or {}) if p != "spec.runPolicy.suspend"]
    if ignored:
        await memo.kube.post_event(
            dict(body), "Warning", "SpecChangeIgnored",
            f"changes to {', '.join(ignored)} after the job was created are ignored: only "
            "spec.runPolicy.suspend may change; delete and re-create the job")


async def poll_forever(index: kopf.Index, memo: kopf.Memo) -> None:
    """Every poll interval, refresh the status of every job the operator sees.

    One loop for all jobs instead of a kopf timer per job: timers need a finalizer on every
    object, which slows down creating jobs and makes deleting them wait for the operator.
    Each cycle lists the trainer Jobs and pods of a namespace once, for all its jobs."""
    limit = asyncio.Semaphore(32)

    async def one(body: dict, views: dict[str, NamespaceView | None]) -> None:
        async with limit:
            try:
                await refresh(body, memo, views)
            except Exception as err:  # noqa: BLE001  (one job's trouble never stops the others)
                memo.metrics.errors.labels("poll").inc()
                log.warning("refreshing %s/%s failed: %s", body["metadata"].get("namespace"),
                            body["metadata"].get("name"), err)

    while True:
        started = time.monotonic()
        bodies = [body for store in list(index.values()) for body in store]
        views = await namespace_views({b["metadata"]["namespace"] for b in bodies if _in_progress(b)}, memo)
        await asyncio.gather(*(one(body, views) for body in bodies))
        await asyncio.sleep(max(0.0, SETTINGS.poll_interval_seconds - (time.monotonic() - started)))


def _in_progress(body: dict) -> bool:
    """Reconciled and not finished: the jobs whose Job and pods a poll cycle reads."""
    phase = (body.get("status") or {}).get("phase")
    return phase in Phase.__members__.values() and not Phase(phase).finished


async def namespace_views(namespaces: set[str], memo: kopf.Memo) -> dict[str, NamespaceView | None]:
    """Every trainer Job and pod of each namespace, two lists per namespace. A namespace
    that cannot be listed maps to None: its jobs keep their status until the next cycle."""
    managed = {naming.MANAGED_BY_LABEL: naming.MANAGER}

    async def view(namespace: str) -> NamespaceView | None:
        try:
            jobs, pods = await asyncio.gather(memo.kube.jobs(namespace, managed), memo.kube.pods(namespace, managed))
        except Exception as err:  # noqa: BLE001  (logged; the next cycle tries again)
            memo.metrics.errors.labels("poll").inc()
            log.warning("listing the trainer Jobs and pods of namespace %s failed: %s", namespace, err)
            return None
        return NamespaceView.of(jobs, pods)

    ordered = sorted(namespaces)
    return dict(zip(ordered, await asyncio.gather(*(view(ns) for ns in ordered)), strict=True))


async def refresh(body: dict, memo: kopf.Memo, views: dict[str, NamespaceView | None]) -> None:
    """Progress from the trainer, Job/pod states, suspend, ttl cleanup: for one job."""
    started = time.perf_counter()
    previous = _previous(body.get("status"))
    if previous is not None and previous.phase.finished:
        await _expire(body, previous, memo)
        return
    if previous is None:
        return  # not reconciled yet: the create handler comes first
    view = views.get(body["metadata"]["namespace"])
    if view is None:
        return  # its namespace could not be listed this cycle (logged)
    try:
        job = _typed(body)
    except SpecError:
        return  # reconcile reported it
    current, obs = await observe(job, previous, memo, view)
    await _sync_suspend(job, obs.job, memo)
    new = current.model_dump(mode="json", by_alias=True)
    if new != previous.model_dump(mode="json", by_alias=True):
        meta = body["metadata"]
        await memo.kube.patch_status(meta["namespace"], meta["name"], new)
    await _announce(body, memo, previous, current, obs)
    memo.metrics.reconcile_seconds.labels("poll").observe(time.perf_counter() - started)


async def _expire(body: dict, previous: DreamBoothJobStatus, memo: kopf.Memo) -> None:
    """runPolicy.ttlSecondsAfterFinished: delete a finished job (its children follow)."""
    ttl = (body.get("spec") or {}).get("runPolicy", {}).get("ttlSecondsAfterFinished")
    finished = parse_time(previous.completion_time)
    if ttl is None or finished is None:
        return
    if datetime.now(UTC) >= finished + timedelta(seconds=int(ttl)):
        meta = body["metadata"]
        log.info("deleting %s/%s: finished %ss ago (ttlSecondsAfterFinished)", meta["namespace"], meta["name"], ttl)
        await memo.kube.delete_dreambooth_job(meta["namespace"], meta["name"])
        memo.metrics.jobs.forget(meta["namespace"], meta["name"])


@kopf.on.delete(*RESOURCE, optional=True)
async def forget(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.metrics.jobs.forget(body["metadata"]["namespace"], body["metadata"]["name"])
