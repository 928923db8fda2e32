"""The DreamBoothJob status: written by the operator alone, read by users and dashboards."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

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


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description="Ready, Running, Succeeded, Failed, Suspended, Stalled; "
                      "SpecChangeIgnored while the spec differs from what the running job follows.")
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


class Outputs(ApiModel):
    model: str | None = Field(None, max_length=2048, description="Final diffusers model folder.")
    single_file: str | None = Field(None, max_length=2048, description="Single-file .safetensors.")
    lora: str | None = Field(None, max_length=2048, description="LoRA weights folder.")
    samples: str | None = Field(None, max_length=2048, description="Folder of sample grids.")


class DreamBoothJobStatus(ApiModel):
    """What the job is doing and where its results are."""

    phase: Phase = Field(Phase.PENDING, description="Where the job is in its lifecycle.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Latest observations of the job's state."
    )
    progress: Progress | None = Field(None, description="Training progress.")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest complete checkpoint.")
    outputs: Outputs | None = Field(None, description="Where the results are.")
    restarts: int = Field(0, ge=0, description="Times the trainer pods were restarted.")
    start_time: Timestamp | None = Field(
        None, description="When training pods were first created.", json_schema_extra={"format": "date-time"}
    )
    completion_time: Timestamp | None = Field(
        None, description="When the job finished.", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation the status describes."
    )
