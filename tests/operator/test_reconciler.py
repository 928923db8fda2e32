"""The reconciler (dreambooth/operator/reconciler.py): its cache of typed jobs per
(uid, generation), its one sync path (what a sync does follows from what it sees), and the
startup that builds it. The sync path runs in-process against the API emulator, driven by
hand (watch events and poll cycles called directly, no kopf)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import kopf
import pytest
import pytest_asyncio

from dreambooth.api.status import DreamBoothJobStatus, Phase
from dreambooth.operator import __main__ as entry
from dreambooth.operator import handlers, typedjobs
from dreambooth.operator.kube import Kube
from dreambooth.operator.metrics import OperatorMetrics
from dreambooth.operator.observed import NamespaceView
from dreambooth.operator.reconciler import Action, Reconciler, next_action
from dreambooth.operator.settings import OperatorSettings
from dreambooth.operator.typedjobs import InvalidJob, TypedJob, TypedJobs
from kubesim.controllers import GarbageCollector
from tests.support.jobs import make_job
from tests.support.kube import kube  # noqa: F401

SETTINGS = OperatorSettings(output_root="s3://dreambooth", metrics_port=0)
#: where every job here starts from (tests/support/jobs.py make_job)
IN_DEFAULT = {"metadata": {"namespace": "default"}, "preset": "object"}
#: no class prompt: what the cross-field rules refuse (the emulator runs no CEL)
INVALID_SPEC = {"preset": "custom", "prior": {"enabled": True}}


def body(generation: int = 1, uid: str = "u-1", labels: dict | None = None, **spec) -> dict:
    """The object as the API server returns it (uid, generation)."""
    metadata = {"generation": generation, "uid": uid} | ({"labels": labels} if labels is not None else {})
    return make_job(IN_DEFAULT, metadata=metadata, **spec)


# --- the cache -----------------------------------------------------------------------------


def test_a_generation_is_validated_once_and_a_new_one_again():
    cache = TypedJobs(SETTINGS)
    first = cache.of(body())
    assert isinstance(first, TypedJob) and first.generation == 1
    assert first.effective.training.steps == 400  # the object preset, resolved
    assert first.output_uri == "s3://dreambooth/default/toy-cat/"
    assert cache.of(body()) is first and cache.built == 1  # a poll's fresh copy: no validation

    second = cache.of(body(2, training={"steps": 800}))
    assert cache.built == 2 and second is not first
    assert second.effective.training.steps == 800 and second.generation == 2
    assert cache.of(body(2, training={"steps": 800})) is second and len(cache) == 1


def test_labels_are_not_in_the_generation_but_rebuild_the_typed_job():
    """The trainer Job's Kueue labels come from the job's labels, which the API server
    changes without a new generation."""
    cache = TypedJobs(SETTINGS)
    plain = cache.of(body())
    queued = cache.of(body(labels={"kueue.x-k8s.io/queue-name": "gpus"}))
    assert cache.built == 2 and queued.job.metadata.labels == {"kueue.x-k8s.io/queue-name": "gpus"}
    assert plain.job.metadata.labels == {}


def test_an_invalid_generation_is_kept_with_its_issues_and_each_job_apart():
    cache = TypedJobs(SETTINGS)
    invalid = cache.of(body(**INVALID_SPEC))
    assert isinstance(invalid, InvalidJob) and invalid.generation == 1
    assert any(issue.startswith("spec.prior.classPrompt") for issue in invalid.issues), invalid.issues
    assert cache.of(body(**INVALID_SPEC)) is invalid and cache.built == 1
    other = cache.of(body(uid="u-2"))  # same name, another object (deleted and re-created)
    assert isinstance(other, TypedJob) and cache.built == 2 and len(cache) == 2
    cache.forget(body(uid="u-2"))
    assert len(cache) == 1 and cache.of(body(**INVALID_SPEC)) is invalid


# --- what a sync does ----------------------------------------------------------------------


def status(phase: Phase) -> DreamBoothJobStatus:
    return DreamBoothJobStatus(phase=phase)


TYPED = TypedJobs(SETTINGS).of(body())
INVALID = TypedJobs(SETTINGS).of(body(**INVALID_SPEC))
WITH_JOB = NamespaceView.of([{"metadata": {"name": "toy-cat-trainer"}}], [])
WITHOUT_JOB = NamespaceView.of([], [])


@pytest.mark.parametrize(
    ("previous", "typed", "view", "action"),
    [
        (status(Phase.SUCCEEDED), None, None, Action.EXPIRE),
        (status(Phase.FAILED), None, WITH_JOB, Action.EXPIRE),
        (None, INVALID, None, Action.REPORT_INVALID),
        (status(Phase.TRAINING), INVALID, WITH_JOB, Action.REPORT_INVALID),  # edited to invalid, no CEL
        (None, TYPED, None, Action.ENSURE),  # just created, or its first sync failed
        (None, TYPED, WITH_JOB, Action.ENSURE),  # no status yet: children too
        (status(Phase.TRAINING), TYPED, None, Action.ENSURE),  # first look since the operator started
        (status(Phase.PENDING), TYPED, WITHOUT_JOB, Action.ENSURE),  # its Job is gone (restart, by hand)
        (status(Phase.TRAINING), TYPED, WITH_JOB, Action.OBSERVE),
    ],
    ids=[
        "finished",
        "failed-with-a-job",
        "new-invalid",
        "running-made-invalid",
        "new",
        "new-with-view",
        "first-look",
        "job-gone",
        "running",
    ],
)
def test_what_a_sync_does_follows_from_what_it_sees(previous, typed, view, action):
    assert next_action(previous, typed, view, "toy-cat") is action
    assert action.handler == ("reconcile" if action in (Action.REPORT_INVALID, Action.ENSURE) else "poll")


# --- the sync path against the emulator --------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """How often the reconciler validates a job and resolves its effective spec."""
    calls = {"validate_job": 0, "effective_spec": 0}
    for name in calls:
        real = getattr(typedjobs, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(typedjobs, name, counting)
    return calls


@pytest_asyncio.fixture
async def reconciler(kube):  # noqa: F811
    """Not started: no poll loop of its own, the test runs the cycles."""
    r = Reconciler(SETTINGS, await Kube.connect(), aiohttp.ClientSession(), OperatorMetrics())
    yield r
    await r.close()


def created(kube, spec_changes: dict | None = None) -> dict:  # noqa: F811
    return kube.create(make_job(IN_DEFAULT, **(spec_changes or {})))


def status_patches(kube) -> int:  # noqa: F811
    return sum(1 for m, p in kube.requests if m == "PATCH" and p.endswith("/dreamboothjobs/toy-cat/status"))


@pytest.mark.asyncio
async def test_poll_cycles_reuse_the_typed_job_until_the_generation_changes(kube, reconciler, counted):  # noqa: F811
    created(kube)
    await reconciler.watched(None, kube.get("dbj", "default", "toy-cat"))  # the initial listing
    assert kube.get("jobs", "default", "toy-cat-trainer")
    for _ in range(3):  # each cycle syncs the newest copy the watch delivered
        await reconciler.watched("MODIFIED", kube.get("dbj", "default", "toy-cat"))
        await reconciler.poll_once()
    assert counted == {"validate_job": 1, "effective_spec": 1}
    assert kube.get("dbj", "default", "toy-cat")["status"]["phase"] == "Pending"

    # a new generation (suspend: what a running job follows) is validated once, and used
    kube.patch("dbj", "default", "toy-cat", {"spec": {"runPolicy": {"suspend": True}}})
    for _ in range(2):
        await reconciler.watched("MODIFIED", kube.get("dbj", "default", "toy-cat"))
        await reconciler.poll_once()
    assert counted == {"validate_job": 2, "effective_spec": 2}
    assert kube.get("jobs", "default", "toy-cat-trainer")["spec"]["suspend"] is True
    assert kube.get("dbj", "default", "toy-cat")["status"]["observedGeneration"] == 2

    await reconciler.watched("DELETED", kube.get("dbj", "default", "toy-cat"))
    assert len(reconciler.typed) == 0 and reconciler.jobs == {}


@pytest.mark.asyncio
async def test_an_invalid_spec_is_reported_once(kube, reconciler, counted):  # noqa: F811
    dbj = created(kube, INVALID_SPEC)
    await reconciler.watched(None, kube.get("dbj", "default", "toy-cat"))
    current = kube.get("dbj", "default", "toy-cat")["status"]
    assert current["phase"] == "Failed"
    assert [c["reason"] for c in current["conditions"] if c["type"] == "Ready"] == ["InvalidSpec"]
    for _ in range(3):  # poll cycles, and a re-listing of the watch (no event type)
        await reconciler.watched(None, kube.get("dbj", "default", "toy-cat"))
        await reconciler.poll_once()
    assert counted["validate_job"] == 1 and status_patches(kube) == 1
    assert [e["reason"] for e in kube.events(dbj)] == ["InvalidSpec"]
    assert kube.find("jobs", "default", "toy-cat-trainer") is None


@pytest.mark.asyncio
async def test_a_running_job_edited_into_an_invalid_spec_is_reported_by_the_next_poll(kube, reconciler):  # noqa: F811
    """Level-triggered: the outcome does not wait for an operator restart (which reported
    it before the two paths became one, while the poll loop left the job alone)."""
    dbj = created(kube)
    await reconciler.watched(None, kube.get("dbj", "default", "toy-cat"))
    kube.patch("dbj", "default", "toy-cat", {"spec": INVALID_SPEC})
    await reconciler.watched("MODIFIED", kube.get("dbj", "default", "toy-cat"))
    await reconciler.poll_once()
    current = kube.get("dbj", "default", "toy-cat")["status"]
    assert current["phase"] == "Failed" and current["observedGeneration"] == 2
    assert "InvalidSpec" in [e["reason"] for e in kube.events(dbj)]


@pytest.mark.asyncio
async def test_a_busy_job_is_left_to_the_sync_that_runs(kube, reconciler):  # noqa: F811
    created(kube)
    doc = kube.get("dbj", "default", "toy-cat")
    reconciler.busy.add(("default", "toy-cat"))
    kube.clear_requests()
    await reconciler.sync(doc)
    await reconciler.watched(None, doc)
    assert kube.requests == []
    reconciler.busy.clear()
    await reconciler.poll_once()  # no status yet: the next cycle creates the children
    assert kube.get("jobs", "default", "toy-cat-trainer")


@pytest.mark.asyncio
async def test_a_job_deleted_while_a_poll_cycle_runs_gets_no_new_children(kube, reconciler):  # noqa: F811
    """Found by bench/operator_chaos.py mass-delete: 1,000 jobs deleted at once, the garbage
    collector removed their children, and the poll cycle under way, which had listed the jobs
    before the DELETED events came, saw no trainer Job and created all three children again
    (a trainer pod too, on a real cluster) for 872 jobs that no longer existed."""
    created(kube)
    doc = kube.get("dbj", "default", "toy-cat")
    await reconciler.watched(None, doc)
    assert kube.get("jobs", "default", "toy-cat-trainer")
    doc = kube.get("dbj", "default", "toy-cat")  # with its status
    kube.delete("dbj", "default", "toy-cat")
    GarbageCollector(kube).collect()
    await reconciler.watched("DELETED", doc)
    await reconciler.sync(doc, NamespaceView.of([], []))  # the cycle's copy, listed before
    for kind in ("jobs", "configmaps", "services"):
        assert kube.list(kind, "default") == [], kind

    # and one marked for deletion (a foreground delete waits for its children) gets none either
    created(kube)
    await reconciler.watched(None, kube.get("dbj", "default", "toy-cat"))
    doc = kube.get("dbj", "default", "toy-cat")
    doc["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    await reconciler.watched("MODIFIED", doc)
    for kind in ("jobs", "configmaps", "services"):
        for obj in kube.list(kind, "default"):
            kube.delete(kind, "default", obj["metadata"]["name"])
    await reconciler.sync(doc, NamespaceView.of([], []))
    for kind in ("jobs", "configmaps", "services"):
        assert kube.list(kind, "default") == [], kind


# --- startup ---------------------------------------------------------------------------------


def test_importing_the_operator_never_reads_the_settings():
    env = {"DREAMBOOTH_POLL_INTERVAL_SECONDS": "often", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", "import dreambooth.operator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_kopf_startup_stops_on_a_bad_setting_naming_it_and_builds_nothing(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_POLL_INTERVAL_SECONDS", "often")
    memo = kopf.Memo()
    with pytest.raises(kopf.PermanentError, match="DREAMBOOTH_POLL_INTERVAL_SECONDS='often': use a whole number"):
        asyncio.run(handlers.startup(settings=kopf.OperatorSettings(), memo=memo))
    assert "reconciler" not in memo
    asyncio.run(handlers.cleanup(memo=memo))  # kopf's cleanup after a failed startup: nothing to close


def test_the_command_stops_on_a_bad_setting_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("DREAMBOOTH_METRICS_PORT", "8081")  # the health port's default
    assert entry.main() == 2
    assert "DREAMBOOTH_METRICS_PORT and DREAMBOOTH_HEALTH_PORT are both 8081" in capsys.readouterr().err
