"""Progress from rank 0's metrics: parsing what the trainer really exports, the ETA and
percent math, stall detection, and scraping over real HTTP (reachable or not)."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from dreambooth.api import telemetry as names
from dreambooth.api.resolve import images_per_step
from dreambooth.api.status import Progress
from dreambooth.operator.progress import (
    TrainerSnapshot,
    format_duration,
    is_stalled,
    metrics_url,
    parse_metrics,
    parse_time,
    progress_from,
    rank0_pod,
    rfc3339,
    scrape,
)
from dreambooth.trainer.metrics import TrainerMetrics  # the exporter: the contract's other side

T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


def trainer_metrics(
    *, phase="training", step=120, total=400, loss=0.1234, lr=2e-6, ips=8.0, checkpoint=100
) -> TrainerMetrics:
    m = TrainerMetrics()
    m.phase.state(phase)
    m.total_steps.set(total)
    if step:
        m.step.set(step)
        m.loss.set(loss)
        m.learning_rate.set(lr)
    if ips:
        m.images_per_second.set(ips)
    if checkpoint:
        m.last_checkpoint_step.set(checkpoint)
    m.checkpoint_upload_seconds.observe(2.0)
    return m


def exposition(**kwargs) -> str:
    return generate_latest(trainer_metrics(**kwargs).registry).decode()


# --- parse_metrics -----------------------------------------------------------------------


def test_parses_what_the_trainer_exports():
    snap = parse_metrics(exposition())
    assert snap == TrainerSnapshot(
        step=120,
        total_steps=400,
        loss=pytest.approx(0.1234),
        learning_rate=pytest.approx(2e-6),
        images_per_second=8.0,
        last_checkpoint_step=100,
        phase="training",
    )


@pytest.mark.parametrize("phase", names.TRAINER_PHASES)
def test_every_trainer_phase_is_read_from_the_enum(phase):
    assert parse_metrics(exposition(phase=phase)).phase == phase


def test_a_fresh_process_reports_nothing_measured():
    """Gauges start at 0: before the first step loss, LR, speed and checkpoint are unknown."""
    snap = parse_metrics(exposition(phase="initializing", step=0, ips=0, checkpoint=0))
    assert snap == TrainerSnapshot(step=0, total_steps=400, phase="initializing")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(f"{names.STEP} 7\n", TrainerSnapshot(step=7), id="step only"),
        pytest.param(
            f"# TYPE {names.STEP} gauge\n{names.STEP} 7\n{names.LOSS} NaN\n{names.LEARNING_RATE} +Inf\n",
            TrainerSnapshot(step=7),
            id="non-finite values dropped",
        ),
        pytest.param(
            f'{names.PHASE}{{{names.PHASE}="training"}} 1\n{names.PHASE}{{{names.PHASE}="bogus"}} 1\n',
            TrainerSnapshot(phase="training"),
            id="phase only, unknown state ignored",
        ),
        pytest.param(
            f"{names.TOTAL_STEPS} 400\n{names.STEP} 3.0\n", TrainerSnapshot(step=3, total_steps=400), id="no TYPE lines"
        ),
    ],
)
def test_partial_metrics_give_what_is_there(text, expected):
    assert parse_metrics(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("<html><body>502 Bad Gateway</body></html>", id="html"),
        pytest.param(f"{names.STEP} not-a-number\n", id="bad value"),
        pytest.param(f'{names.STEP}{{le="1" 3\n', id="broken labels"),
        pytest.param("process_cpu_seconds_total 3.2\npython_info 1\n", id="not a trainer"),
        pytest.param("\x00\x01garbage", id="binary"),
    ],
)
def test_unparseable_or_foreign_text_gives_none(text):
    assert parse_metrics(text) is None


# --- progress_from -------------------------------------------------------------------------


def test_progress_math():
    snap = parse_metrics(exposition(step=100, total=400, ips=8.0))
    p = progress_from(snap, None, T0, images_per_step=4)
    assert (p.step, p.total_steps, p.percent, p.summary) == (100, 400, 25.0, "100/400")
    assert p.eta_seconds == 150  # 300 steps x 4 images / 8 images/s
    assert p.loss == pytest.approx(0.1234) and p.learning_rate == pytest.approx(2e-6)
    assert p.images_per_second == 8.0
    assert p.updated_at == p.step_changed_at == "2026-11-24T10:00:00Z"


def test_eta_counts_class_images_and_rounds_up():
    assert images_per_step(2, prior_preservation=True) == 4
    assert images_per_step(2, prior_preservation=False) == 2
    snap = TrainerSnapshot(step=1, total_steps=4, images_per_second=3.0)
    assert progress_from(snap, None, T0, images_per_step=4).eta_seconds == 4  # ceil(3*4/3.0)
    assert progress_from(snap, None, T0, images_per_step=5).eta_seconds == 5


def test_no_eta_without_a_speed_and_zero_at_the_end():
    assert progress_from(TrainerSnapshot(step=5, total_steps=10), None, T0, 1).eta_seconds is None
    done = progress_from(TrainerSnapshot(step=10, total_steps=10, images_per_second=2.0), None, T0, 1)
    assert (done.eta_seconds, done.percent, done.summary) == (0, 100.0, "10/10")


def test_total_steps_come_from_the_spec_until_the_trainer_says():
    p = progress_from(TrainerSnapshot(step=0, phase="initializing"), None, T0, 1, total_steps=400)
    assert (p.step, p.total_steps, p.summary, p.percent) == (0, 400, "0/400", 0.0)


def test_unreachable_endpoint_keeps_the_last_progress():
    last = progress_from(TrainerSnapshot(step=5, total_steps=10), None, T0, 1)
    assert progress_from(None, last, T0 + timedelta(seconds=30), 1) is last
    assert progress_from(None, None, T0, 1) is None


def test_a_restarted_trainer_does_not_reset_the_shown_step():
    """A new pod reports step 0 until it has resumed and trained a step."""
    last = progress_from(TrainerSnapshot(step=300, total_steps=400, loss=0.2, learning_rate=1e-6), None, T0, 1)
    fresh = TrainerSnapshot(step=0, total_steps=400, last_checkpoint_step=300, phase="initializing")
    p = progress_from(fresh, last, T0 + timedelta(minutes=2), 1)
    assert (p.step, p.loss, p.learning_rate, p.summary) == (300, 0.2, 1e-6, "300/400")
    assert p.step_changed_at == last.step_changed_at
    assert p.updated_at == "2026-11-24T10:02:00Z"
    resumed = progress_from(TrainerSnapshot(step=201, total_steps=400), p, T0 + timedelta(minutes=3), 1)
    assert resumed.step == 201  # resumed from an older checkpoint: the truth, even backwards
    assert resumed.step_changed_at == "2026-11-24T10:03:00Z"


def test_step_changed_at_moves_only_with_the_step():
    p1 = progress_from(TrainerSnapshot(step=10, total_steps=100), None, T0, 1)
    p2 = progress_from(TrainerSnapshot(step=10, total_steps=100, loss=0.3), p1, T0 + timedelta(seconds=10), 1)
    assert (p2.step_changed_at, p2.updated_at) == ("2026-11-24T10:00:00Z", "2026-11-24T10:00:10Z")
    p3 = progress_from(TrainerSnapshot(step=11, total_steps=100), p2, T0 + timedelta(seconds=20), 1)
    assert p3.step_changed_at == "2026-11-24T10:00:20Z"


@given(
    step=st.integers(0, 10**6),
    total=st.integers(0, 10**6),
    ips=st.one_of(st.none(), st.floats(1e-3, 1e5)),
    per_step=st.integers(1, 2048),
)
def test_progress_is_always_a_valid_status(step, total, ips, per_step):
    snap = TrainerSnapshot(step=step, total_steps=total or None, images_per_second=ips)
    p = progress_from(snap, None, T0, per_step)
    Progress.model_validate(p.model_dump())  # bounds: percent in [0, 100], eta >= 0
    assert 0 <= p.percent <= 100
    assert p.eta_seconds is None or p.eta_seconds >= 0
    assert len(p.summary) <= 64


# --- stall detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idle", "stalled"),
    [
        (timedelta(0), False),
        (timedelta(minutes=9, seconds=59), False),
        (timedelta(minutes=10), True),
        (timedelta(hours=3), True),
    ],
)
def test_stalled_when_the_step_has_not_moved_for_the_timeout(idle, stalled):
    p = progress_from(TrainerSnapshot(step=42, total_steps=100), None, T0, 1)
    again = progress_from(TrainerSnapshot(step=42, total_steps=100), p, T0 + idle, 1)
    assert is_stalled(again, T0 + idle, timedelta(minutes=10)) is stalled


def test_stall_is_unknown_without_progress():
    assert not is_stalled(None, T0, timedelta(0))
    assert not is_stalled(Progress(), T0, timedelta(0))


# --- helpers --------------------------------------------------------------------------------


def test_times_are_rfc3339_utc():
    from datetime import timezone

    assert rfc3339(datetime(2026, 1, 2, 5, 4, 5, 999, tzinfo=timezone(timedelta(hours=2)))) == "2026-01-02T03:04:05Z"
    assert parse_time("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("yesterday") is None and parse_time(None) is None
    with pytest.raises(ValueError, match="naive"):
        rfc3339(datetime(2026, 1, 1))


def test_durations_read_well():
    assert [format_duration(s) for s in (0, 42, 303, 3720)] == ["0s", "42s", "5m03s", "1h02m"]


def _pod(index: str | None, phase="Running", ip="10.1.2.3", deleting=False):
    meta = {
        "name": f"p{index}",
        "annotations": {} if index is None else {"batch.kubernetes.io/job-completion-index": index},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-24T10:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "podIP": ip}}


def test_rank0_pod_and_its_metrics_url():
    pods = [_pod("1"), _pod("0", phase="Pending"), _pod("0", ip="10.0.0.9")]
    assert rank0_pod(pods)["status"]["podIP"] == "10.0.0.9"
    assert rank0_pod([_pod("1"), _pod("0", deleting=True)]) is None
    assert metrics_url(rank0_pod(pods), 9090) == "http://10.0.0.9:9090/metrics"
    assert metrics_url(_pod("0", ip="fd00::5"), 9090) == "http://[fd00::5]:9090/metrics"
    assert metrics_url(_pod("0", ip=None), 9090) is None


# --- scraping over real HTTP ----------------------------------------------------------------


@pytest.fixture
def trainer_endpoint():
    """The trainer's own metrics server (prometheus_client's) on a free local port."""
    metrics = trainer_metrics()
    port = metrics.serve(0, addr="127.0.0.1")
    yield metrics, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.asyncio
async def test_scrape_reads_the_trainer_endpoint(trainer_endpoint):
    metrics, url = trainer_endpoint
    snap = await scrape(url, timeout=5)
    assert (snap.step, snap.total_steps, snap.phase, snap.last_checkpoint_step) == (120, 400, "training", 100)
    metrics.step.set(121)
    metrics.phase.state("exporting")
    snap = await scrape(url, timeout=5)
    assert (snap.step, snap.phase) == (121, "exporting")


@pytest.mark.asyncio
async def test_scrape_with_a_shared_session(trainer_endpoint):
    import aiohttp

    _, url = trainer_endpoint
    async with aiohttp.ClientSession() as session:
        assert (await scrape(url, 5, session=session)).step == 120
        assert (await scrape(url, 5, session=session)).step == 120


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(lambda: web.Response(status=500, text=f"{names.STEP} 5\n"), id="HTTP 500"),
        pytest.param(lambda: web.Response(status=404), id="HTTP 404"),
        pytest.param(lambda: web.Response(text="<html>proxy error</html>"), id="not metrics"),
        pytest.param(
            lambda: web.Response(body=b"\xff\xfe\x00garbage", content_type="text/plain", charset="utf-8"),
            id="undecodable",
        ),
    ],
)
async def test_scrape_of_a_bad_answer_is_none(respond):
    async def handler(request):
        return respond()

    runner, url = await _serve(handler)
    try:
        assert await scrape(url, timeout=5) is None
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_scrape_of_a_closed_port_is_none_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    assert await scrape(f"http://127.0.0.1:{port}/metrics", timeout=5) is None
    assert time.monotonic() - start < 2


@pytest.mark.asyncio
async def test_scrape_of_a_silent_endpoint_times_out_quickly():
    """A pod that accepts connections but never answers (hung trainer, half-dead node)."""
    release = asyncio.Event()

    async def handler(request):
        await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="")

    runner, url = await _serve(handler)
    try:
        start = time.monotonic()
        assert await scrape(url, timeout=0.5) is None
        assert time.monotonic() - start < 2
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.asyncio
async def test_scrape_of_a_bad_url_is_none():
    assert await scrape("http://nonexistent.invalid:9090/metrics", timeout=2) is None
    assert await scrape("not a url", timeout=1) is None
