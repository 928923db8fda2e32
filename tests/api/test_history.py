"""history.jsonl: bounded, and the same steps whether a run was killed and resumed or not."""

from __future__ import annotations

import pytest

from dreambooth.api.history import MAX_POINTS, History, Point, parse, stride


def point(step: int, prior: bool = False) -> Point:
    return Point(
        step,
        loss=1 / step,
        instance_loss=1 / step,
        lr=1e-4,
        time=1000.0 + step,
        prior_loss=0.5 / step if prior else None,
    )


def run(steps: range, max_points: int, history: History | None = None) -> History:
    history = history or History(max_points=max_points)
    for step in steps:
        history.add(point(step))
    return history


@pytest.mark.parametrize(
    "total, max_points, every",
    [
        (10, 10, 1),
        (11, 10, 2),
        (20, 10, 2),
        (21, 10, 4),
        (100_000, MAX_POINTS, 64),
    ],
)
def test_a_long_run_keeps_at_most_max_points_evenly_spaced(total, max_points, every):
    history = run(range(1, total + 1), max_points)
    steps = [p.step for p in history.points]
    assert stride(total, max_points) == every
    assert steps == list(range(every, total + 1, every))
    assert max_points // 2 <= len(steps) <= max_points or total < max_points


@pytest.mark.parametrize("kill_at", [1, 7, 10, 11, 33, 64, 99])
def test_resuming_from_a_checkpoint_keeps_what_an_uninterrupted_run_keeps(kill_at):
    straight = run(range(1, 101), 16)
    before = run(range(1, kill_at + 20 if kill_at + 20 <= 100 else 101), 16)  # ran past the checkpoint
    saved = History.from_bytes(before.up_to(kill_at).to_bytes(), 16)  # what the checkpoint holds
    resumed = run(range(kill_at + 1, 101), 16, saved)
    assert resumed.to_bytes() == straight.to_bytes()


def test_lines_round_trip_with_and_without_prior_loss():
    history = History([point(1, prior=True), point(2)])
    lines = history.to_bytes().decode().splitlines()
    assert '"priorLoss"' in lines[0] and '"priorLoss"' not in lines[1]
    assert parse(history.to_bytes()) == [point(1, prior=True), point(2)]


def test_a_torn_line_and_steps_out_of_order_are_skipped():
    data = History([point(1), point(2)]).to_bytes() + b'{"step": 1, "loss": 0.1, "lr": 1}\n{"step": 3, "lo'
    assert [p.step for p in parse(data)] == [1, 2]


def test_a_step_added_twice_is_refused():
    history = History([point(3)])
    with pytest.raises(ValueError, match="step 3 after step 3"):
        history.add(point(3))
