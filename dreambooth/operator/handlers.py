"""kopf registrations, and nothing else: startup builds the :class:`Reconciler` (the
operator's loop: dreambooth/operator/reconciler.py) and the :class:`Sweeper` (the
DreamBoothSweep loop: dreambooth/operator/sweeper.py) from the settings, one raw-event
handler per resource hands them every watch event (a sweep's run's events go to the
sweeper too), cleanup closes them. The operator is the only writer of ``.status`` and
writes nothing else on a DreamBoothJob or DreamBoothSweep (but a run's suspend).

    kopf run --standalone --all-namespaces -m dreambooth.operator   (or: dreambooth-operator)
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import kopf

from dreambooth.api.job import GROUP, PLURAL, VERSION
from dreambooth.api.sweep import PLURAL as SWEEPS
from dreambooth.operator.reconciler import Reconciler
from dreambooth.operator.settings import OperatorSettings, SettingsError
from dreambooth.operator.sweeper import Sweeper

RESOURCE = (GROUP, VERSION, PLURAL)
SWEEP_RESOURCE = (GROUP, VERSION, SWEEPS)


def read_settings() -> OperatorSettings:
    """The ``DREAMBOOTH_*`` settings; an invalid one stops kopf's startup (and so the
    operator, whichever command started it) with a message naming the variable."""
    try:
        return OperatorSettings.from_env()
    except SettingsError as err:
        raise kopf.PermanentError(str(err)) from None


def tune_gc() -> None:
    """Everything imported so far lives as long as the process: out of the collector's way.
    Collections every 50,000 net allocations instead of 700: a new job allocates a few
    thousand objects, and with 1,000 jobs each full pass walks all of them (-13% CPU)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = read_settings()
    # Only a raw-event handler: kopf keeps no state on the objects (no annotations, no
    # finalizers, no extra write per job); .status is ours alone.
    settings.posting.level = logging.WARNING  # only warnings of kopf itself become Events
    # kopf's own requests (its listings, Events) get the same bound as ours; a dead watch
    # stream is kopf's inactivity_timeout's (70 s without an event or bookmark)
    settings.networking.request_timeout = config.api_timeout_seconds
    # kopf logs "Handler 'watched' succeeded" for every watch event (each status write of
    # each job): our own log says what happened; kopf's per-object warnings still show
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    tune_gc()
    memo.reconciler = await Reconciler.start(config)
    memo.sweeper = Sweeper(config, memo.reconciler.kube)
    memo.sweeper.start()


@kopf.on.event(*RESOURCE)
async def watched(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event of a DreamBoothJob (kopf's initial listing has no event type)."""
    reconciler: Reconciler = memo.reconciler
    await reconciler.watched(event["type"], event["object"])
    sweeper: Sweeper | None = memo.get("sweeper")
    if sweeper is not None and event["type"] is not None:
        await sweeper.run_changed(event["object"])


@kopf.on.event(*SWEEP_RESOURCE)
async def sweep_watched(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event of a DreamBoothSweep."""
    sweeper: Sweeper = memo.sweeper
    await sweeper.watched(event["type"], event["object"])


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    sweeper: Sweeper | None = memo.get("sweeper")
    if sweeper is not None:
        await sweeper.close()
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.close()
