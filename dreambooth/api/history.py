"""``history.jsonl``: the per-step record of a run (loss, prior loss, learning rate, time),
written by the trainer next to its checkpoints and read by anything that plots a run.

One JSON object a line, steps ascending::

    {"step": 10, "loss": 0.1234, "instanceLoss": 0.1234, "priorLoss": 0.098, "lr": 2e-06, "time": 1767225600.1}

``priorLoss`` only with prior preservation. **Bounded:** at most :data:`MAX_POINTS` lines
(about 100 bytes each). While a run's newest step is at most ``MAX_POINTS`` every step is
kept; beyond, only the steps that are multiples of the *stride*, the smallest power of two
with ``newest step / stride <= MAX_POINTS``: doubling the stride drops every other point,
so a long run keeps between half and all of ``MAX_POINTS`` evenly spaced steps. Which steps
are kept depends on the newest step alone, so a run killed and resumed from a checkpoint
keeps exactly the steps an uninterrupted run keeps.

**Tied to checkpoints:** a checkpoint folder holds the history up to its step; a resumed
run starts from that one (so nothing after the checkpoint is kept twice, and nothing before
it is lost) and rewrites the top-level ``history.jsonl`` whole each time it writes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

#: the most lines a history holds
MAX_POINTS = 2000


@dataclass(frozen=True)
class Point:
    """One optimizer step."""

    step: int
    loss: float
    instance_loss: float
    lr: float
    time: float
    prior_loss: float | None = None

    def wire(self) -> dict:
        out = {"step": self.step, "loss": _short(self.loss), "instanceLoss": _short(self.instance_loss)}
        if self.prior_loss is not None:
            out["priorLoss"] = _short(self.prior_loss)
        out.update(lr=_short(self.lr), time=round(self.time, 1))
        return out

    @classmethod
    def from_wire(cls, data: dict) -> Point:
        prior = data.get("priorLoss")
        return cls(
            step=int(data["step"]),
            loss=float(data["loss"]),
            instance_loss=float(data.get("instanceLoss", data["loss"])),
            lr=float(data["lr"]),
            time=float(data.get("time", 0.0)),
            prior_loss=None if prior is None else float(prior),
        )


def _short(value: float) -> float:
    """Six significant digits: enough for a plot, a third of the bytes of a full float."""
    return float(f"{value:.6g}") if math.isfinite(value) else value


def stride(newest_step: int, max_points: int = MAX_POINTS) -> int:
    """Every how many steps a history whose newest step is ``newest_step`` keeps one."""
    every = 1
    while newest_step > every * max_points:
        every *= 2
    return every


class History:
    """The points of a run so far, decimated as it grows (see the module's docstring)."""

    def __init__(self, points: list[Point] | None = None, max_points: int = MAX_POINTS) -> None:
        self.max_points = max_points
        self.points: list[Point] = []
        self.every = 1
        for point in points or ():
            self.add(point)

    def add(self, point: Point) -> None:
        if self.points and point.step <= self.points[-1].step:
            raise ValueError(f"step {point.step} after step {self.points[-1].step}")
        every = stride(point.step, self.max_points)
        if every != self.every:
            self.every = every
            self.points = [p for p in self.points if p.step % every == 0]
        if point.step % every == 0:
            self.points.append(point)

    def up_to(self, step: int) -> History:
        """The history a run resuming at ``step`` continues from."""
        return History([p for p in self.points if p.step <= step], self.max_points)

    def to_bytes(self) -> bytes:
        return "".join(json.dumps(p.wire(), separators=(",", ":")) + "\n" for p in self.points).encode()

    @classmethod
    def from_bytes(cls, data: bytes, max_points: int = MAX_POINTS) -> History:
        return cls(parse(data), max_points)


def parse(data: bytes) -> list[Point]:
    """The points of a ``history.jsonl``; a line that does not parse (a torn write of an
    older version, a hand edit) is skipped, as are steps out of order."""
    points: list[Point] = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            point = Point.from_wire(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
        if not points or point.step > points[-1].step:
            points.append(point)
    return points
