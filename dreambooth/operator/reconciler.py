"""The operator's loop as one object: built once at startup from the typed settings, it
holds the API client, the HTTP session for scrapes, the metrics, the newest copy of every
DreamBoothJob and the typed job of each one's generation (:mod:`typedjobs`).

One level-triggered path, :meth:`Reconciler.sync`, brings a job up to date; the watch
handler calls it for a job seen for the first time (or without a status), the poll loop
for every job each poll interval. What it does follows from what it sees, not from who
called (:func:`next_action`): a finished job is only expired (ttl); an invalid spec is
reported; a job without a status, or whose trainer Job is not known to exist, gets its
children created (idempotently; never for a job deleted or being deleted) and then is observed; otherwise it is observed: the Job
and pods, rank 0's metrics, the status computed (pure), written once, then the actions it
implies (suspend, deleting the failed Job of a multi-node job that restarts). Whatever
fails is logged, counted and tried again by the next poll cycle. A job being synced is
"busy": no second sync of it starts meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import aiohttp

from dreambooth.api.status import DreamBoothJobStatus, Phase
from dreambooth.operator import naming, resources
from dreambooth.operator.events import transition_events
from dreambooth.operator.kube import Kube
from dreambooth.operator.metrics import OperatorMetrics
from dreambooth.operator.observed import NamespaceView
from dreambooth.operator.pods import of_job
from dreambooth.operator.progress import metrics_url, parse_time, rank0_pod, scrape
from dreambooth.operator.restarts import Step, next_step, running_or_stopping
from dreambooth.operator.settings import OperatorSettings
from dreambooth.operator.status import compute_status, invalid_spec_status
from dreambooth.operator.typedjobs import (
    InvalidJob,
    TypedJob,
    TypedJobs,
    observation,
    previous_status,
    trainer_inputs,
)
from dreambooth.operator.verdict import Observation

log = logging.getLogger("dreambooth.operator")

Key = tuple[str, str]  # (namespace, name)
#: the ``handler`` label of the reconcile histogram and the error counter
RECONCILE, POLL = "reconcile", "poll"
#: scrapes (3 s timeout) and API calls in flight at once in a poll cycle
POLL_CONCURRENCY = 64
#: poll cycles under way at once: one held by a slow request, and the next
CYCLES_IN_FLIGHT = 2


class Action(Enum):
    """What one sync of a job does."""

    EXPIRE = "expire"  # finished: never re-run; deleted once its ttl is over
    REPORT_INVALID = "reportInvalid"  # Failed with reason InvalidSpec, no Job (no retry loop)
    ENSURE = "ensure"  # create the children that are missing, then observe
    OBSERVE = "observe"  # its Job exists: observe, write the status, act on it

    @property
    def handler(self) -> str:
        return RECONCILE if self in (Action.REPORT_INVALID, Action.ENSURE) else POLL


def next_action(
    previous: DreamBoothJobStatus | None, typed: TypedJob | InvalidJob | None, view: NamespaceView | None, name: str
) -> Action:
    """Pure. ``typed`` may be None for a finished job (it is not needed); ``view``: the poll
    cycle's listing of the job's namespace (None: nothing is known, read what is needed)."""
    if previous is not None and previous.phase.finished:
        return Action.EXPIRE
    if isinstance(typed, InvalidJob):
        return Action.REPORT_INVALID
    if previous is None or view is None or view.trainer_job(name) is None:
        return Action.ENSURE
    return Action.OBSERVE


def job_key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return meta["namespace"], meta["name"]


def in_progress(body: Mapping[str, Any]) -> bool:
    """Reconciled and not finished: the jobs whose Job and pods a poll cycle reads."""
    phase = (body.get("status") or {}).get("phase")
    return phase in Phase.__members__.values() and not Phase(phase).finished


def _cycle_done(cycles: set[asyncio.Task[None]]) -> Any:
    """A finished poll cycle leaves ``cycles``; an error it raised is logged (syncs and
    listings keep theirs, so this is a bug's last line)."""

    def done(task: asyncio.Task[None]) -> None:
        cycles.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a poll cycle failed", exc_info=task.exception())

    return done


class Reconciler:
    def __init__(
        self, settings: OperatorSettings, kube: Kube, http: aiohttp.ClientSession, metrics: OperatorMetrics
    ) -> None:
        self.settings, self.kube, self.http, self.metrics = settings, kube, http, metrics
        self.jobs: dict[Key, dict[str, Any]] = {}  # the newest copy of every job seen
        self.busy: set[Key] = set()  # jobs being synced now
        self.typed = TypedJobs(settings)
        self.poller: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: OperatorSettings) -> Reconciler:
        """Connect to the API, serve the metrics, start the poll loop."""
        reconciler = cls(
            settings, await Kube.connect(settings.api_timeout_seconds), aiohttp.ClientSession(), OperatorMetrics()
        )
        if settings.metrics_port:
            reconciler.metrics.serve(settings.metrics_port)
        reconciler.poller = asyncio.create_task(reconciler.poll_forever())
        return reconciler

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        await self.http.close()
        await self.kube.close()

    # --- the watch ---------------------------------------------------------------------

    async def watched(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event: keep the newest copy for the poll loop (a fresh dict per event,
        which kopf does not change); sync a job seen for the first time since the operator
        started (kopf's initial listing has no event type) or one without a status yet."""
        key = job_key(body)
        if event_type == "DELETED":
            self.jobs.pop(key, None)
            self.typed.forget(body)
            self.metrics.jobs.forget(*key)
            return
        self.jobs[key] = body
        if event_type is None or not (body.get("status") or {}).get("phase"):
            await self.sync(body)

    # --- the one sync path ---------------------------------------------------------------

    async def sync(self, body: dict[str, Any], view: NamespaceView | None = None) -> None:
        """Bring one job up to date (see the module's docstring). A failure is logged and
        counted; the next poll cycle tries again."""
        key = job_key(body)
        if key in self.busy:
            return
        self.busy.add(key)
        started = time.perf_counter()
        action = Action.OBSERVE
        try:
            previous = previous_status(body)
            finished = previous is not None and previous.phase.finished
            typed = None if finished else self.typed.of(body)
            action = next_action(previous, typed, view, key[1])
            if action is Action.EXPIRE:
                await self._expire(body, previous)
                return
            if action is Action.REPORT_INVALID:
                await self._report_invalid(body, typed, previous)
            elif action is Action.ENSURE:
                await self._ensure(body, typed, previous, view)
            else:
                await self._observe(body, typed, previous, view)
            self.metrics.reconcile_seconds.labels(action.handler).observe(time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001  (retried by the poller, every poll interval)
            self.metrics.errors.labels(action.handler).inc()
            if action.handler == RECONCILE:
                log.warning(
                    "reconciling %s/%s failed (retried in %ss): %s", *key, self.settings.poll_interval_seconds, err
                )
            else:
                log.warning("refreshing %s/%s failed: %s", *key, err)
        finally:
            self.busy.discard(key)

    async def _expire(self, body: dict[str, Any], previous: DreamBoothJobStatus) -> None:
        """A finished job is never re-run (its Job may be gone); with
        runPolicy.ttlSecondsAfterFinished it is deleted (its children follow) that long
        after it finished."""
        meta = body["metadata"]
        self.metrics.jobs.set(meta["namespace"], meta["name"], previous.phase)
        ttl = (body.get("spec") or {}).get("runPolicy", {}).get("ttlSecondsAfterFinished")
        finished = parse_time(previous.completion_time)
        if ttl is None or finished is None:
            return
        if datetime.now(UTC) >= finished + timedelta(seconds=int(ttl)):
            log.info("deleting %s/%s: finished %ss ago (ttlSecondsAfterFinished)", meta["namespace"], meta["name"], ttl)
            await self.kube.delete_dreambooth_job(meta["namespace"], meta["name"])
            self.metrics.jobs.forget(meta["namespace"], meta["name"])

    async def _report_invalid(
        self, body: dict[str, Any], invalid: InvalidJob, previous: DreamBoothJobStatus | None
    ) -> None:
        """Permanent until the spec changes (a new generation is validated again)."""
        status = invalid_spec_status(list(invalid.issues), invalid.generation, datetime.now(UTC), previous)
        await self._write(body, previous, status)

    async def _ensure(
        self, body: dict[str, Any], typed: TypedJob, previous: DreamBoothJobStatus | None, view: NamespaceView | None
    ) -> None:
        """Create (idempotently) the ConfigMap, headless Service and Indexed Job, owned by
        the job (deleting it deletes them); the Job last: its pods mount the rest. A new
        Job only once no pod of the job runs or stops: two generations never train at once."""
        *first, trainer = resources.children(trainer_inputs(typed, self.settings, previous, datetime.now(UTC)))
        if self.gone(body):
            return
        await asyncio.gather(*(self.kube.ensure(child) for child in first))
        meta = typed.job.metadata
        pods = (
            view.trainer_pods(meta.name) if view else await self.kube.pods(meta.namespace, naming.selector(meta.name))
        )
        if self.gone(body):
            return
        if not any(map(running_or_stopping, pods)) and await self.kube.ensure(trainer):
            current, obs = self._status(typed, previous, trainer, [], None)  # a new Job: as built
            await self._write(body, previous, current, obs)
            return
        await self._observe(body, typed, previous, view, pods)

    def gone(self, body: dict[str, Any]) -> bool:
        """Deleted (the watch said so since ``body`` was read: a poll cycle's copy may be
        older than the DELETED event), re-created under another uid, or being deleted: no
        new children for it (the garbage collector would delete them; a trainer pod would
        start meanwhile)."""
        current = self.jobs.get(job_key(body))
        return (
            current is None
            or current["metadata"].get("uid") != body["metadata"].get("uid")
            or bool(current["metadata"].get("deletionTimestamp"))
        )

    async def _observe(
        self,
        body: dict[str, Any],
        typed: TypedJob,
        previous: DreamBoothJobStatus | None,
        view: NamespaceView | None,
        pods: list[dict[str, Any]] | None = None,
    ) -> None:
        current, obs = await self.observe(typed, previous, view, pods)
        await self._sync_suspend(typed, obs.job)
        await self._write(body, previous, current, obs)
        await self._act(typed, obs, current)

    async def observe(
        self,
        typed: TypedJob,
        previous: DreamBoothJobStatus | None,
        view: NamespaceView | None = None,
        pods: list[dict[str, Any]] | None = None,
    ) -> tuple[DreamBoothJobStatus, Observation]:
        """The Job and the job's pods (from the poll cycle's ``view``, else read now; ``pods``:
        just listed), rank 0's metrics; the status computed from them (pure)."""
        meta = typed.job.metadata
        if view is not None:
            batch_job, pods = view.trainer_job(meta.name), view.trainer_pods(meta.name)
        else:
            batch_job = await self.kube.job(meta.namespace, naming.trainer_name(meta.name))
            if pods is None:
                pods = await self.kube.pods(meta.namespace, naming.selector(meta.name))
        snapshot = None
        pod = rank0_pod(of_job(batch_job, pods))  # not an earlier attempt's pod 0
        if pod is not None and (pod.get("status") or {}).get("phase") == "Running":
            url = metrics_url(pod, self.settings.trainer_metrics_port)
            if url:
                snapshot = await scrape(url, session=self.http)
        return self._status(typed, previous, batch_job, pods, snapshot)

    def _status(
        self,
        typed: TypedJob,
        previous: DreamBoothJobStatus | None,
        batch_job: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        snapshot: Any,
    ) -> tuple[DreamBoothJobStatus, Observation]:
        obs = observation(typed, self.settings, batch_job, pods, snapshot)
        return compute_status(obs, previous, datetime.now(UTC)), obs

    async def _sync_suspend(self, typed: TypedJob, batch_job: dict[str, Any] | None) -> None:
        """spec.runPolicy.suspend drives the Job's suspend. Under Kueue (a queue label on the
        job) Kueue alone suspends and admits the Job, so the operator stays out of it."""
        meta = typed.job.metadata
        if naming.QUEUE_LABEL in meta.labels:
            return
        wanted = typed.job.spec.run_policy.suspend
        if batch_job is not None and bool((batch_job.get("spec") or {}).get("suspend")) != wanted:
            await self.kube.suspend_job(meta.namespace, naming.trainer_name(meta.name), wanted)

    async def _act(self, typed: TypedJob, obs: Observation, status: DreamBoothJobStatus) -> None:
        """After the status is written: delete the failed Job of a multi-node job that
        restarts (its pods stop; a later pass creates the new Job once none is left)."""
        if obs.job is not None and next_step(obs.job, obs.pods, status) is Step.DELETE_JOB:
            meta = typed.job.metadata
            name = naming.trainer_name(meta.name)
            log.info(
                "deleting the failed Job %s/%s: all %d pods of %s restart together",
                meta.namespace,
                name,
                obs.nodes,
                meta.name,
            )
            await self.kube.delete_job(meta.namespace, name, obs.job["metadata"]["uid"])

    async def _write(
        self,
        body: dict[str, Any],
        previous: DreamBoothJobStatus | None,
        status: DreamBoothJobStatus,
        obs: Observation | None = None,
    ) -> None:
        """The whole status in one merge patch when it changed (nulls clear fields), then the
        phase metrics (they follow the status at once) and the Events the change implies.
        The poll loop's copy of the job gets the new status at once."""
        new = status.model_dump(mode="json", by_alias=True)
        meta = body["metadata"]
        if previous is None or new != previous.model_dump(mode="json", by_alias=True):
            await self.kube.patch_status(meta["namespace"], meta["name"], new)
            body["status"] = new
        self.metrics.entered(previous.phase if previous else None, status.phase)
        self.metrics.jobs.set(meta["namespace"], meta["name"], status.phase)
        for event in transition_events(previous, status, obs):
            await self.kube.post_event(dict(body), event.type, event.reason, event.message)

    # --- the poll loop -------------------------------------------------------------------

    async def poll_forever(self) -> None:
        """Every poll interval, bring every job the operator sees up to date.

        One loop for all jobs instead of a kopf timer per job (timers need a finalizer on
        every object: an extra write per job, and deletions that wait for the operator).
        A cycle is awaited for one interval at most: a sync held by a slow or unanswered
        request (up to DREAMBOOTH_API_TIMEOUT_SECONDS) goes on in the background, and the
        next cycle starts on time and skips the jobs still busy, so one job's trouble never
        holds back the others' statuses."""
        limit = asyncio.Semaphore(POLL_CONCURRENCY)
        cycles: set[asyncio.Task[None]] = set()
        try:
            while True:
                while len(cycles) >= CYCLES_IN_FLIGHT:  # an API slow for everyone: no pile-up of listings
                    await asyncio.wait(set(cycles), return_when=asyncio.FIRST_COMPLETED)
                started = time.monotonic()
                cycle = asyncio.create_task(self.poll_once(limit))
                cycles.add(cycle)
                cycle.add_done_callback(_cycle_done(cycles))
                await asyncio.wait([cycle], timeout=self.settings.poll_interval_seconds)
                await asyncio.sleep(max(0.0, self.settings.poll_interval_seconds - (time.monotonic() - started)))
        finally:
            for cycle in cycles:
                cycle.cancel()

    async def poll_once(self, limit: asyncio.Semaphore | None = None) -> None:
        """One cycle: list the trainer Jobs and pods of each namespace with a job in progress
        once, for all its jobs, then sync every job that is not busy (one job's trouble never
        stops the others: :meth:`sync` keeps its errors). A job in progress whose namespace
        could not be listed keeps its status until the next cycle."""
        limit = limit or asyncio.Semaphore(POLL_CONCURRENCY)
        bodies = [body for key, body in list(self.jobs.items()) if key not in self.busy]
        views = await self.namespace_views({b["metadata"]["namespace"] for b in bodies if in_progress(b)})

        async def one(body: dict[str, Any]) -> None:
            view = views.get(body["metadata"]["namespace"]) if in_progress(body) else None
            if view is None and in_progress(body):
                return  # its namespace could not be listed this cycle (logged)
            async with limit:
                await self.sync(body, view)

        await asyncio.gather(*(one(body) for body in bodies))

    async def namespace_views(self, namespaces: set[str]) -> dict[str, NamespaceView | None]:
        """Every trainer Job and pod of each namespace, two lists per namespace. A namespace
        that cannot be listed maps to None."""
        managed = {naming.MANAGED_BY_LABEL: naming.MANAGER}

        async def view(namespace: str) -> NamespaceView | None:
            try:
                jobs, pods = await asyncio.gather(
                    self.kube.jobs(namespace, managed), self.kube.pods(namespace, managed)
                )
            except Exception as err:  # noqa: BLE001  (logged; the next cycle tries again)
                self.metrics.errors.labels(POLL).inc()
                log.warning("listing the trainer Jobs and pods of namespace %s failed: %s", namespace, err)
                return None
            return NamespaceView.of(jobs, pods)

        ordered = sorted(namespaces)
        return dict(zip(ordered, await asyncio.gather(*(view(ns) for ns in ordered)), strict=True))
