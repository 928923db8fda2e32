"""The DreamBoothJob status: written by the operator alone, read by users and dashboards."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from dreambooth.api.evaluation import Figures, Sign
from dreambooth.api.spec import ApiModel

Timestamp = str  # RFC 3339, e.g. 2026-11-24T10:00:00Z


class Phase(StrEnum):
    PENDING = "Pending"
    INITIALIZING = "Initializing"
    GENERATING_CLASS_IMAGES = "GeneratingClassImages"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    """The conditions of a DreamBoothJob's status (all six always, Overfitting and
    Underfitting with spec.evaluation.enabled)."""

    READY = "Ready"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    STALLED = "Stalled"
    OVERFITTING = "Overfitting"
    UNDERFITTING = "Underfitting"


class Reason(StrEnum):
    """The reasons the operator gives in conditions and Events (the trainer's own verdicts,
    e.g. ``BadData``, come from its termination summary: dreambooth/api/termination.py).
    A running job's Ready reason is its phase (``Training``, ...)."""

    # on its way (Pending, nothing for the user to do)
    CREATING = "Creating"
    WAITING_FOR_PODS = "WaitingForPods"
    SCHEDULING = "Scheduling"
    CONTAINER_CREATING = "ContainerCreating"
    POD_INITIALIZING = "PodInitializing"
    RESTARTING = "Restarting"
    RECREATING = "Recreating"
    # suspended, preempted, done
    SUSPEND_REQUESTED = "SuspendRequested"
    JOB_SUSPENDED = "JobSuspended"
    PREEMPTED = "Preempted"
    EXPORTING = "Exporting"
    SUCCEEDED = "Succeeded"
    # needs someone: Pending
    INVALID_SPEC = "InvalidSpec"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    CONFIG_MAP_NOT_FOUND = "ConfigMapNotFound"
    CONTAINER_WAITING = "ContainerWaiting"
    # needs someone: Failed
    OOM_KILLED = "OOMKilled"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    POD_FAILURE_POLICY = "PodFailurePolicy"
    JOB_FAILED = "JobFailed"
    DISRUPTED = "Disrupted"
    ERROR = "Error"
    UNKNOWN = "Unknown"
    # the Stalled condition
    NO_PROGRESS = "NoProgress"
    PROGRESSING = "Progressing"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    # the Overfitting and Underfitting conditions (True: a sign of dreambooth.api.evaluation)
    MEMORIZATION = Sign.MEMORIZATION.value
    DIVERSITY_COLLAPSE = Sign.DIVERSITY_COLLAPSE.value
    PRIOR_LOSS_DRIFT = Sign.PRIOR_LOSS_DRIFT.value
    SUBJECT_NOT_LEARNED = Sign.SUBJECT_NOT_LEARNED.value
    NOT_EVALUATED = "NotEvaluated"
    NO_SIGN = "NoSign"
    # Events only
    RESTARTED = "Restarted"
    STALLED = "Stalled"
    CHECKPOINT_SAVED = "CheckpointSaved"


#: Pending reasons that mean "on its way", not "needs you"
BENIGN_PENDING: frozenset[str] = frozenset(
    {
        Reason.CREATING,
        Reason.WAITING_FOR_PODS,
        Reason.SCHEDULING,
        Reason.CONTAINER_CREATING,
        Reason.POD_INITIALIZING,
        Reason.RESTARTING,
        Reason.RECREATING,
    }
)


def progress_summary(step: int, total: int) -> tuple[float, str]:
    """``(percent, "step/total")`` of a run, as the status and ``kubectl get`` show them."""
    if not total:
        return 0.0, str(step)
    return round(min(100.0, 100.0 * step / total), 1), f"{step}/{total}"


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(
        max_length=316,
        description="Ready, Running, Succeeded, Failed, Suspended, Stalled; "
        "Overfitting and Underfitting with spec.evaluation.enabled.",
    )
    status: str = Field(pattern=r"^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason, e.g. Unschedulable, OOMKilled, InvalidSpec.",
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: Timestamp = Field(
        description="When the status last changed.", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation this condition was computed from."
    )


class Progress(ApiModel):
    """Training progress as read from the trainer's metrics."""

    step: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(0, ge=0, description="Optimizer steps in the whole run.")
    percent: float = Field(0.0, ge=0, le=100, description="step / totalSteps in percent.")
    summary: str = Field("", max_length=64, description="step/totalSteps, for kubectl get.")
    loss: float | None = Field(None, description="Recent training loss.")
    learning_rate: float | None = Field(None, ge=0, description="Current learning rate.")
    images_per_second: float | None = Field(None, ge=0, description="Training throughput.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to finish training.")
    updated_at: Timestamp | None = Field(
        None, description="When progress was last read.", json_schema_extra={"format": "date-time"}
    )
    step_changed_at: Timestamp | None = Field(
        None,
        description="When step last changed; a job whose step stays put longer than the "
        "operator's stall timeout gets the Stalled condition.",
        json_schema_extra={"format": "date-time"},
    )


class CheckpointRef(ApiModel):
    step: int = Field(ge=0, description="Step of the newest complete checkpoint.")
    uri: str = Field(max_length=2048, description="Where it is.")


class Evaluation(Figures):
    """The latest evaluated sample round (docs/evaluation.md) and the best checkpoint so far."""

    base_subject_fidelity: float | None = Field(
        None, description="Subject fidelity of the base model's samples (before the first step)."
    )
    score: float | None = Field(None, description="subjectFidelity + promptFidelity of the latest round.")
    best_checkpoint: CheckpointRef | None = Field(
        None, description="The checkpoint with the best score so far, rounds without an overfitting sign first."
    )
    updated_at: Timestamp | None = Field(
        None, description="When these figures were read.", json_schema_extra={"format": "date-time"}
    )


class Outputs(ApiModel):
    model: str | None = Field(None, max_length=2048, description="Final diffusers model folder.")
    single_file: str | None = Field(None, max_length=2048, description="Single-file .safetensors.")
    lora: str | None = Field(None, max_length=2048, description="LoRA weights folder.")
    lora_kohya: str | None = Field(
        None, max_length=2048, description="LoRA weights in the kohya/WebUI format (one .safetensors)."
    )
    samples: str | None = Field(None, max_length=2048, description="Folder of sample grids.")
    best_checkpoint: str | None = Field(
        None,
        max_length=2048,
        description="The checkpoint to use: the best evaluated one (the final "
        "model's folder when the last step is best); what output.export: best exported.",
    )


class DreamBoothJobStatus(ApiModel):
    """What the job is doing and where its results are."""

    phase: Phase = Field(Phase.PENDING, description="Where the job is in its lifecycle.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Latest observations of the job's state."
    )
    progress: Progress | None = Field(None, description="Training progress.")
    family: str | None = Field(
        None,
        max_length=32,
        description="The base model's family (sd, sdxl): the one baseModel.family "
        "names, or the one the trainer found in the model for auto.",
    )
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest complete checkpoint.")
    evaluation: Evaluation | None = Field(None, description="The latest evaluated sample round.")
    outputs: Outputs | None = Field(None, description="Where the results are.")
    restarts: int = Field(0, ge=0, description="Times the trainer pods were restarted.")
    start_time: Timestamp | None = Field(
        None, description="When training pods were first created.", json_schema_extra={"format": "date-time"}
    )
    completion_time: Timestamp | None = Field(
        None, description="When the job finished.", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(None, ge=0, description="The spec generation the status describes.")
