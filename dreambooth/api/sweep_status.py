"""The DreamBoothSweep status: a table of its runs, written by the operator alone."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from dreambooth.api.evaluation import Figures
from dreambooth.api.spec import ApiModel
from dreambooth.api.sweep import MAX_ROWS


class SweepPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPARING = "Comparing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class SweepRow(ApiModel):
    """One (run, step, scheduler) of the comparison."""

    run: str = Field(max_length=63, description="The run's DreamBoothJob.")
    values: dict[str, str] = Field(
        default_factory=dict,
        max_length=16,
        description="The run's value of each training axis (as text), e.g. training.learningRate: 5e-06.",
    )
    step: int = Field(ge=0, description="The checkpoint's step (a training.steps value).")
    scheduler: str = Field(max_length=32, description="The scheduler the samples were drawn with.")
    phase: str = Field("Pending", max_length=32, description="The run's phase.")
    final_loss: float | None = Field(None, description="The run's last training loss.")
    evaluation: Figures | None = Field(
        None, description="The evaluation of this step's samples (the run's main scheduler), once known."
    )
    samples: str | None = Field(None, max_length=2048, description="The sample grid of this row.")
    best_checkpoint: str | None = Field(None, max_length=2048, description="The run's best checkpoint.")
    message: str = Field("", max_length=1024, description="Why the run failed, when it did.")


class DreamBoothSweepStatus(ApiModel):
    """Where the sweep is, and its table."""

    phase: SweepPhase = Field(SweepPhase.PENDING, description="Where the sweep is in its lifecycle.")
    runs_total: int = Field(0, ge=0, description="Runs the axes make.")
    runs_created: int = Field(0, ge=0, description="Runs created so far (at most maxParallel unfinished).")
    runs_succeeded: int = Field(0, ge=0, description="Runs that succeeded.")
    runs_failed: int = Field(0, ge=0, description="Runs that failed (the others go on).")
    summary: str = Field("", max_length=32, description="finished/total runs, for kubectl get.")
    best_run: str | None = Field(None, max_length=63, description="The run with the best evaluation score.")
    best_step: int | None = Field(None, ge=0, description="The best run's best step.")
    rows: list[SweepRow] = Field(
        default_factory=list, max_length=MAX_ROWS, description="One row per (run, step, scheduler)."
    )
    compare: str | None = Field(None, max_length=2048, description="compare.png: rows runs x steps, columns prompts.")
    compare_json: str | None = Field(None, max_length=2048, description="compare.json: every figure.")
    message: str = Field("", max_length=4096, description="What the sweep is waiting for, or why it failed.")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation the status describes.")
