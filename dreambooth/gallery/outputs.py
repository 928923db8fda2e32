"""What a job has written so far, from the keys of its output prefix: pure.

The job page's "checkpoints" are the steps it drew sample grids at (``samples/step-N.png``):
those are what a person compares. Each also says whether its checkpoint folder is still
there (the trainer keeps only ``checkpointing.keep`` of them) and carries its evaluation
figures (``evaluation.jsonl``, one JSON object a line with a ``step``) where there are any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dreambooth.api import layout


@dataclass(frozen=True)
class StepView:
    step: int
    grid: str | None  # key of the sample grid
    checkpoint: bool  # its checkpoint folder has a manifest (complete)
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Outputs:
    steps: list[StepView]
    progression: bool
    history: bool
    evaluation: bool
    result: bool
    exports: list[str]  # keys of exported files/folders present: model/, model.safetensors, lora/

    @property
    def step_numbers(self) -> list[int]:
        return [s.step for s in self.steps]


def evaluation_figures(data: bytes | None) -> dict[int, dict[str, float]]:
    """``{step: {figure: value}}`` of an ``evaluation.jsonl``: every number of a line but its
    step (nested objects are flattened as ``a.b``); lines that do not parse are skipped."""
    out: dict[int, dict[str, float]] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        figures: dict[str, float] = {}
        _flatten(row, "", figures)
        figures.pop("step", None)
        out[step] = figures
    return out


def _flatten(value: object, prefix: str, into: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}{k}.", into)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        into[prefix[:-1]] = float(value)


def outputs_of(keys: list[str], evaluation: bytes | None = None) -> Outputs:
    """The page's view of a job's output keys (relative to its prefix)."""
    grids: dict[int, str] = {}
    complete: set[int] = set()
    for key in keys:
        step = layout.sample_grid_step(key)
        if step is not None:
            grids[step] = key
        found = layout.checkpoint_step(key)
        if found and found[1] == layout.MANIFEST:
            complete.add(found[0])
    figures = evaluation_figures(evaluation)
    steps = sorted(set(grids) | set(figures))
    present = set(keys)
    exports = [
        k
        for k in (layout.MODEL, layout.SINGLE_FILE, layout.LORA)
        if k in present or any(key.startswith(k) for key in keys if k.endswith("/"))
    ]
    return Outputs(
        steps=[StepView(s, grids.get(s), s in complete, figures.get(s, {})) for s in steps],
        progression=layout.PROGRESSION in present,
        history=layout.HISTORY in present,
        evaluation=layout.EVALUATION in present,
        result=layout.RESULT in present,
        exports=exports,
    )


def figure_names(outputs: Outputs) -> list[str]:
    """Every evaluation figure any step has, in the order first seen."""
    names: dict[str, None] = {}
    for s in outputs.steps:
        names.update(dict.fromkeys(s.figures))
    return list(names)
