"""What every step of a run shares, and what a run reports when it ends."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.api.config import TrainerConfig
from dreambooth.api.history import History
from dreambooth.api.resolve import total_steps
from dreambooth.api.spec import DreamBoothJobSpec
from dreambooth.api.status import Evaluation
from dreambooth.trainer.background import Background, poll_seconds
from dreambooth.trainer.metrics import TrainerMetrics
from dreambooth.trainer.storage import S3Settings, Storage


@dataclass
class Outcome:
    step: int
    outputs: dict[str, str] = field(default_factory=dict)
    #: the loss of the last optimizer step this process ran (None: it ran none)
    loss: float | None = None
    last_checkpoint: str | None = None
    #: the latest evaluated round and the best checkpoint (spec.evaluation; main process)
    evaluation: Evaluation | None = None


@dataclass
class Context:
    config: TrainerConfig
    workdir: Path
    accelerator: object
    s3: S3Settings | None
    output: Storage
    metrics: TrainerMetrics | None
    stop: threading.Event
    #: the main process's storage thread (uploads, export); close() it when the run ends
    background: Background | None = None
    #: the evaluator of sample rounds (spec.evaluation.enabled; main process only)
    judge: object | None = None
    #: the run's per-step history (history.jsonl); a resumed run's starts as its checkpoint's
    history: History = field(default_factory=History)
    #: when history.jsonl was last handed to the storage thread (time.monotonic())
    history_published: float = 0.0

    def __post_init__(self) -> None:
        if self.background is None:
            self.background = Background(getattr(self.accelerator, "device", None))

    @property
    def spec(self) -> DreamBoothJobSpec:
        return self.config.spec

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def total_steps(self) -> int:
        return total_steps(self.config.spec)

    @property
    def poll_s(self) -> float:
        """How long one collective of a wait for slow work lasts (see background.together)."""
        return poll_seconds(self.spec.run_policy.collective_timeout_seconds)
