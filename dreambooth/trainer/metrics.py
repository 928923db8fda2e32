"""Prometheus metrics of a training run, served by rank 0.

Base units, the ``dreambooth_trainer_`` prefix, and no per-step or per-prompt labels: the
operator reads this endpoint for the job's status, Prometheus scrapes it for Grafana. The
names are defined once in :mod:`dreambooth.api.telemetry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from dreambooth.api import telemetry as names

#: upload times of checkpoints range from a second (LoRA) to minutes (full SD, slow S3)
UPLOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.step = Gauge(names.STEP, "Optimizer steps completed.", registry=r)
        self.total_steps = Gauge(names.TOTAL_STEPS, "Optimizer steps of the whole run.", registry=r)
        self.loss = Gauge(names.LOSS, "Training loss of the last optimizer step.", registry=r)
        self.instance_loss = Gauge(names.INSTANCE_LOSS, "Loss on the instance images of the last step.", registry=r)
        self.prior_loss = Gauge(
            names.PRIOR_LOSS, "Prior-preservation loss on class images of the last step.", registry=r
        )
        self.learning_rate = Gauge(names.LEARNING_RATE, "Current learning rate.", registry=r)
        self.images_per_second = Gauge(
            names.IMAGES_PER_SECOND, "Training images processed per second, all processes.", registry=r
        )
        self.last_checkpoint_step = Gauge(
            names.LAST_CHECKPOINT_STEP, "Step of the newest complete checkpoint.", registry=r
        )
        self.checkpoint_upload_seconds = Histogram(
            names.CHECKPOINT_UPLOAD_SECONDS,
            "Time to write one checkpoint to storage.",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.checkpoint_upload_failures = Counter(
            names.CHECKPOINT_UPLOAD_FAILURES, "Checkpoint uploads that failed.", registry=r
        )
        self.gpu_memory_bytes = Gauge(names.GPU_MEMORY_BYTES, "Peak GPU memory allocated by this process.", registry=r)
        evaluation = (
            ("evaluation_step", names.EVALUATION_STEP, "Step of the latest evaluated sample round."),
            ("subject_fidelity", names.SUBJECT_FIDELITY, "Mean CLIP similarity of the samples to the instance photos."),
            ("base_subject_fidelity", names.BASE_SUBJECT_FIDELITY, "Subject fidelity of the base model's samples."),
            ("prompt_fidelity", names.PROMPT_FIDELITY, "Mean CLIP similarity of the samples to their prompts."),
            (
                "memorization",
                names.MEMORIZATION,
                "Per prompt, the highest similarity of a sample to a training photo; mean over prompts.",
            ),
            (
                "sample_similarity",
                names.SAMPLE_SIMILARITY,
                "Mean pairwise similarity of a prompt's samples; mean over prompts (1: no diversity).",
            ),
            ("prior_loss_drift", names.PRIOR_LOSS_DRIFT, "Class-image loss against the first round's, minus 1."),
            ("evaluation_score", names.EVALUATION_SCORE, "Subject fidelity + prompt fidelity of the latest round."),
            ("best_step", names.BEST_CHECKPOINT_STEP, "Step of the best evaluated checkpoint so far."),
        )
        for attr, name, doc in evaluation:  # NaN: not measured (yet)
            gauge = Gauge(name, doc + " NaN until measured.", registry=r)
            gauge.set(float("nan"))
            setattr(self, attr, gauge)
        self.family = Info(names.MODEL, "The base model, as the trainer found it (its family).", registry=r)
        self.phase = Enum(names.PHASE, "What the trainer is doing.", states=list(names.TRAINER_PHASES), registry=r)

    def report_evaluation(self, evaluation) -> None:
        """Publish ``evaluation`` (a :class:`dreambooth.api.status.Evaluation`)."""

        def put(gauge, value) -> None:
            gauge.set(float("nan") if value is None else value)

        put(self.evaluation_step, evaluation.step)
        put(self.subject_fidelity, evaluation.subject_fidelity)
        put(self.base_subject_fidelity, evaluation.base_subject_fidelity)
        put(self.prompt_fidelity, evaluation.prompt_fidelity)
        put(self.memorization, evaluation.memorization)
        put(self.sample_similarity, evaluation.sample_similarity)
        put(self.prior_loss_drift, evaluation.prior_loss_drift)
        put(self.evaluation_score, evaluation.score)
        put(self.best_step, evaluation.best_checkpoint.step if evaluation.best_checkpoint else None)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` (0 picks a free one); returns the port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]
