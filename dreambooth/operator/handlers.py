"""kopf handlers: thin. One raw-event handler keeps the newest copy of every DreamBoothJob
and reconciles new ones (validate into the typed job, build the children with pure
functions, ensure they exist, write the status); one poll loop observes the rest (Job +
pods + rank 0's metrics) and retries whatever failed: level-triggered. The whole status is
written once per pass; the operator is the only writer of ``.status`` and writes nothing
else on a DreamBoothJob.

    kopf run --standalone --all-namespaces -m dreambooth.operator   (or: dreambooth-operator)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
from dreambooth.operator.events import transition_events
from dreambooth.operator.kube import Kube
from dreambooth.operator.metrics import OperatorMetrics
from dreambooth.operator.observed import NamespaceView
from dreambooth.operator.pods import of_job
from dreambooth.operator.progress import metrics_url, parse_time, rank0_pod, scrape
from dreambooth.operator.restarts import Step, next_step, running_or_stopping
from dreambooth.operator.settings import OperatorSettings, SettingsError
from dreambooth.operator.status import Observation, compute_status, invalid_spec_status

log = logging.getLogger("dreambooth.operator")

#: read once, when kopf imports the handlers; an invalid setting stops the operator at
#: startup with a message naming it (importing this module never fails on one)
try:
    SETTINGS, SETTINGS_ERROR = OperatorSettings.from_env(), None
except SettingsError as _err:
    SETTINGS, SETTINGS_ERROR = OperatorSettings(), _err
RESOURCE = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    if SETTINGS_ERROR is not None:
        raise kopf.PermanentError(str(SETTINGS_ERROR))
    # Only a raw-event handler: kopf keeps no state on the objects (no annotations, no
    # finalizers, no extra write per job); .status is ours alone.
    settings.posting.level = logging.WARNING  # only warnings of kopf itself become Events
    # kopf logs "Handler 'watched' succeeded" for every watch event (each status write of
    # each job): our own log says what happened; kopf's per-object warnings still show
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Everything imported so far lives as long as the process: out of the collector's way.
    # Collections every 50,000 net allocations instead of 700: a new job allocates a few
    # thousand objects, and with 1,000 jobs each full pass walks all of them (-13% CPU).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    memo.jobs = {}  # (namespace, name) -> the newest DreamBoothJob seen
    memo.busy = set()  # keys being reconciled now (the poller leaves them alone)
    memo.kube = await Kube.connect()
    memo.http = aiohttp.ClientSession()
    memo.metrics = OperatorMetrics()
    if SETTINGS.metrics_port:
        memo.metrics.serve(SETTINGS.metrics_port)
    memo.poller = asyncio.create_task(poll_forever(memo))


@kopf.on.event(*RESOURCE)
async def watched(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event of a DreamBoothJob: keep the newest copy for the poller; reconcile
    a job seen for the first time since the operator started (kopf's initial listing has
    no event type) or one without a status yet (just created)."""
    body = event["object"]  # a fresh dict per event, which kopf does not change
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if event["type"] == "DELETED":
        memo.jobs.pop(key, None)
        memo.metrics.jobs.forget(*key)
        return
    memo.jobs[key] = body
    if event["type"] is None or not (body.get("status") or {}).get("phase"):
        await reconcile(body, memo)


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


def _typed(body: dict[str, Any]) -> DreamBoothJob:
    return validate_job(
        {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body["metadata"]),
         "spec": dict(body.get("spec") or {})},
        cluster=True,
    )


async def _announce(body: Any, memo: kopf.Memo, previous: DreamBoothJobStatus | None,
                    status: DreamBoothJobStatus, obs: Observation | None) -> None:
    """The phase metrics (first: they follow the status at once), then the Events a status
    change implies."""
    memo.metrics.entered(previous.phase if previous else None, status.phase)
    memo.metrics.jobs.set(body["metadata"]["namespace"], body["metadata"]["name"], status.phase)
    for event in transition_events(previous, status, obs):
        await memo.kube.post_event(dict(body), event.type, event.reason, event.message)


async def observe(job: DreamBoothJob, previous: DreamBoothJobStatus | None, memo: kopf.Memo,
                  view: NamespaceView | None = None,
                  pods: list[dict[str, Any]] | None = None) -> tuple[DreamBoothJobStatus, Observation]:
    """The Job and the job's pods (from the poll cycle's ``view``, else read now; ``pods``:
    just listed), rank 0's metrics; the status computed from them (pure)."""
    meta, kube = job.metadata, memo.kube
    if view is not None:
        batch_job, pods = view.trainer_job(meta.name), view.trainer_pods(meta.name)
    else:
        batch_job = await kube.job(meta.namespace, naming.trainer_name(meta.name))
        if pods is None:
            pods = await kube.pods(meta.namespace, naming.selector(meta.name))
    snapshot = None
    pod = rank0_pod(of_job(batch_job, pods))  # not an earlier attempt's pod 0
    if pod is not None and (pod.get("status") or {}).get("phase") == "Running":
        url = metrics_url(pod, SETTINGS.trainer_metrics_port)
        if url:
            snapshot = await scrape(url, session=memo.http)
    return _status(job, previous, batch_job, pods, snapshot)


def _status(job: DreamBoothJob, previous: DreamBoothJobStatus | None, batch_job: dict[str, Any] | None,
            pods: list[dict[str, Any]], snapshot: Any) -> tuple[DreamBoothJobStatus, Observation]:
    obs = Observation.of(  # with a Job: its own pods (an earlier attempt's may be going)
        effective_spec(job.spec), generation=job.metadata.generation or 0,
        output_uri=output_uri_for(job, SETTINGS.defaults()), job=batch_job, pods=of_job(batch_job, pods),
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


async def reconcile(body: dict, memo: kopf.Memo, view: NamespaceView | None = None) -> None:
    """Create (idempotently) the ConfigMap, headless Service and Indexed Job of a job and
    write its status. A failure is logged and counted; the next poll cycle tries again."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if key in memo.busy:
        return
    memo.busy.add(key)
    started = time.perf_counter()
    try:
        await _reconcile(body, memo, view)
    except Exception as err:  # noqa: BLE001  (retried by the poller, every poll interval)
        memo.metrics.errors.labels("reconcile").inc()
        log.warning("reconciling %s/%s failed (retried in %ss): %s", *key, SETTINGS.poll_interval_seconds, err)
    else:
        memo.metrics.reconcile_seconds.labels("reconcile").observe(time.perf_counter() - started)
    finally:
        memo.busy.discard(key)


def trainer_inputs(job: DreamBoothJob, previous: DreamBoothJobStatus | None,
                   now: datetime) -> resources.TrainerInputs:
    """What a Job created now is built from: the restarts counted so far, and the seconds
    since the job first started (its activeDeadlineSeconds counts from then)."""
    started = parse_time(previous.start_time) if previous else None
    elapsed = int((now - started).total_seconds()) if started else 0
    return resources.TrainerInputs(job, SETTINGS, restarts=previous.restarts if previous else 0,
                                   elapsed_seconds=elapsed)


async def _reconcile(body: dict, memo: kopf.Memo, view: NamespaceView | None = None) -> None:
    previous = _previous(body.get("status"))
    try:
        job = _typed(body)
    except SpecError as err:
        now = datetime.now(UTC)
        status = invalid_spec_status([str(i) for i in err.issues], body["metadata"].get("generation", 0), now,
                                     previous)
        await _write(body, memo, previous, status)
        return  # permanent until the spec changes: no retry loop
    if previous is not None and previous.phase.finished:
        memo.metrics.jobs.set(job.metadata.namespace, job.metadata.name, previous.phase)
        return  # a finished job is never re-run (its Job may be gone: ttl)
    # owned by the job (deleting it deletes them); the Job last: its pods mount the rest
    *first, trainer = resources.children(trainer_inputs(job, previous, datetime.now(UTC)))
    await asyncio.gather(*(memo.kube.ensure(child) for child in first))
    meta = job.metadata
    pods = view.trainer_pods(meta.name) if view else await memo.kube.pods(meta.namespace, naming.selector(meta.name))
    # a new Job only once no pod of the job runs or stops: two generations never train at once
    if not any(map(running_or_stopping, pods)) and await memo.kube.ensure(trainer):
        current, obs = _status(job, previous, trainer, [], None)  # a new Job: as built
        await _write(body, memo, previous, current, obs)
        return
    current, obs = await observe(job, previous, memo, view, pods)
    await _sync_suspend(job, obs.job, memo)
    await _write(body, memo, previous, current, obs)
    await _act(job, obs, current, memo)


async def _act(job: DreamBoothJob, obs: Observation, status: DreamBoothJobStatus, memo: kopf.Memo) -> None:
    """After the status is written: delete the failed Job of a multi-node job that restarts
    (its pods stop; a later pass creates the new Job once none is left)."""
    if obs.job is not None and next_step(obs.job, obs.pods, status) is Step.DELETE_JOB:
        meta = job.metadata
        name = naming.trainer_name(meta.name)
        log.info("deleting the failed Job %s/%s: all %d pods of %s restart together", meta.namespace, name,
                 obs.nodes, meta.name)
        await memo.kube.delete_job(meta.namespace, name, obs.job["metadata"]["uid"])


async def _write(body: dict, memo: kopf.Memo, previous: DreamBoothJobStatus | None,
                 status: DreamBoothJobStatus, obs: Observation | None = None) -> None:
    """The whole status in one merge patch when it changed (nulls clear fields), then the
    Events it implies. The poller's copy of the job gets the new status at once."""
    new = status.model_dump(mode="json", by_alias=True)
    if previous is None or new != previous.model_dump(mode="json", by_alias=True):
        meta = body["metadata"]
        await memo.kube.patch_status(meta["namespace"], meta["name"], new)
        body["status"] = new
    await _announce(body, memo, previous, status, obs)


async def poll_forever(memo: kopf.Memo) -> None:
    """Every poll interval, bring every job the operator sees up to date.

    One loop for all jobs instead of a kopf timer per job (timers need a finalizer on every
    object: an extra write per job, and deletions that wait for the operator). Each cycle
    lists the trainer Jobs and pods of a namespace once, for all its jobs, and retries any
    job whose reconcile failed."""
    limit = asyncio.Semaphore(64)  # mostly waiting on scrapes (3 s timeout) and API calls

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
        bodies = [body for key, body in list(memo.jobs.items()) if key not in memo.busy]
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
        await reconcile(body, memo)  # its first reconcile failed: again
        return
    view = views.get(body["metadata"]["namespace"])
    if view is None:
        return  # its namespace could not be listed this cycle (logged)
    if view.trainer_job(body["metadata"]["name"]) is None:
        # its Job is gone (a restart, or deleted by hand): created again once no pod is left
        await reconcile(body, memo, view)
        return
    try:
        job = _typed(body)
    except SpecError:
        return  # reconcile reported it
    current, obs = await observe(job, previous, memo, view)
    await _sync_suspend(job, obs.job, memo)
    await _write(body, memo, previous, current, obs)
    await _act(job, obs, current, memo)
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
