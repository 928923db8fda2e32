"""The operator's DreamBoothSweep loop: each sync lists the sweep's runs (by label), creates
the next ones (at most maxParallel unfinished), mirrors spec.suspend onto them, runs the
comparison Job once every run has finished, and writes the status. The decisions are
dreambooth/operator/sweeps.py's (pure); this module does the calls, through ``kube``.

A sweep is synced on its own watch events, when one of its runs changes (the job watch
hands those on) and every poll interval; deleting it deletes its runs and the comparison
Job (ownerReferences: the garbage collector).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dreambooth.api.job import SpecError
from dreambooth.api.sweep import validate_sweep
from dreambooth.api.sweep_runs import SWEEP_LABEL
from dreambooth.api.sweep_status import DreamBoothSweepStatus, SweepPhase
from dreambooth.operator import sweeps
from dreambooth.operator.kube import Kube
from dreambooth.operator.settings import OperatorSettings

log = logging.getLogger(__name__)

Key = tuple[str, str]
_FINISHED = (SweepPhase.SUCCEEDED.value, SweepPhase.FAILED.value)


def key_of(body: dict[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


class Sweeper:
    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings, self.kube = settings, kube
        self.sweeps: dict[Key, dict[str, Any]] = {}  # the newest copy of every sweep seen
        self.busy: set[Key] = set()
        self.poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.poller = asyncio.create_task(self.poll_forever())

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller

    async def watched(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.sweeps.pop(key_of(body), None)
            return
        self.sweeps[key_of(body)] = body
        await self.sync(body)

    async def run_changed(self, job: dict[str, Any]) -> None:
        """A DreamBoothJob changed: sync its sweep, if it is a run of one."""
        sweep = ((job.get("metadata") or {}).get("labels") or {}).get(SWEEP_LABEL)
        body = self.sweeps.get((job["metadata"].get("namespace"), sweep)) if sweep else None
        if body is not None:
            await self.sync(body)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_seconds)
            await asyncio.gather(*(self.sync(b) for k, b in list(self.sweeps.items()) if k not in self.busy))

    async def sync(self, body: dict[str, Any]) -> None:
        key = key_of(body)
        if key in self.busy or (body.get("status") or {}).get("phase") in _FINISHED:
            return
        self.busy.add(key)
        try:
            await self._sync(body)
        except Exception as err:  # noqa: BLE001  (retried every poll interval)
            log.warning(
                "reconciling sweep %s/%s failed (retried in %ss): %s", *key, self.settings.poll_interval_seconds, err
            )
        finally:
            self.busy.discard(key)

    async def _sync(self, body: dict[str, Any]) -> None:
        namespace, name = key_of(body)
        try:
            sweep = validate_sweep(body, cluster=True)
        except SpecError as err:
            status = DreamBoothSweepStatus(
                phase=SweepPhase.FAILED, message=str(err)[:4096], observed_generation=body["metadata"].get("generation")
            )
            await self._write(body, status)
            return
        defaults = self.settings.defaults()
        children = sweeps.children_of(name, await self.kube.dreambooth_jobs(namespace, {SWEEP_LABEL: name}))
        todo = sweeps.actions(sweep, children, defaults)
        for job in todo.create:
            await self.kube.create_dreambooth_job(job)
            children[job["metadata"]["name"]] = job
        for run, suspend in todo.suspend:
            await self.kube.suspend_dreambooth_job(namespace, run, suspend)
        status = sweeps.sweep_status(sweep, children, defaults)
        if status.phase is SweepPhase.COMPARING:
            job = sweeps.compare_job(sweep, self.settings)
            await self.kube.ensure(job)
            outcome = sweeps.compare_outcome(await self.kube.job(namespace, job["metadata"]["name"]))
            summary = None
            if outcome:
                summary = sweeps.compare_summary(await self.kube.pods(namespace, {SWEEP_LABEL: name}))
            if outcome is not None:
                status = sweeps.sweep_status(sweep, children, defaults, compared=outcome, summary=summary)
            if outcome is False:
                status = status.model_copy(
                    update={
                        "phase": SweepPhase.FAILED,
                        "message": f"the comparison Job {job['metadata']['name']} failed: see its pod's log",
                    }
                )
        await self._write(body, status)

    async def _write(self, body: dict[str, Any], status: DreamBoothSweepStatus) -> None:
        wire = status.model_dump(mode="json", by_alias=True)  # nulls clear fields (a merge patch)
        if body.get("status") == status.model_dump(mode="json", by_alias=True, exclude_none=True):
            return
        await self.kube.patch_sweep_status(*key_of(body), wire)
        # what the next sync compares with until the watch brings the stored copy
        body["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        if status.phase.value in _FINISHED:
            log.info("sweep %s/%s %s: %s", *key_of(body), status.phase.value, status.summary)
