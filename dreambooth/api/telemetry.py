"""Names of the trainer's Prometheus metrics: the contract between the trainer (which
exports them), the operator (which reads rank 0's endpoint for status) and the dashboards.
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "dreambooth_trainer_"

STEP = PREFIX + "step"
TOTAL_STEPS = PREFIX + "total_steps"
LOSS = PREFIX + "loss"
INSTANCE_LOSS = PREFIX + "instance_loss"
PRIOR_LOSS = PREFIX + "prior_loss"
LEARNING_RATE = PREFIX + "learning_rate"
IMAGES_PER_SECOND = PREFIX + "images_per_second"
LAST_CHECKPOINT_STEP = PREFIX + "last_checkpoint_step"
CHECKPOINT_UPLOAD_SECONDS = PREFIX + "checkpoint_upload_seconds"
CHECKPOINT_UPLOAD_FAILURES = PREFIX + "checkpoint_upload_failures"
GPU_MEMORY_BYTES = PREFIX + "gpu_memory_bytes"
PHASE = PREFIX + "phase"
#: the latest evaluated sample round (NaN until measured; docs/evaluation.md)
EVALUATION_STEP = PREFIX + "evaluation_step"
SUBJECT_FIDELITY = PREFIX + "evaluation_subject_fidelity"
BASE_SUBJECT_FIDELITY = PREFIX + "evaluation_base_subject_fidelity"
PROMPT_FIDELITY = PREFIX + "evaluation_prompt_fidelity"
MEMORIZATION = PREFIX + "evaluation_memorization"
SAMPLE_SIMILARITY = PREFIX + "evaluation_sample_similarity"
PRIOR_LOSS_DRIFT = PREFIX + "evaluation_prior_loss_drift"
EVALUATION_SCORE = PREFIX + "evaluation_score"
BEST_CHECKPOINT_STEP = PREFIX + "evaluation_best_step"
#: an info metric (``dreambooth_trainer_model_info{family="sdxl"} 1``): the base model's family
MODEL = PREFIX + "model"
MODEL_FAMILY_LABEL = "family"


class TrainerPhase(StrEnum):
    """Values of the phase metric's label, in the order a run goes through them (a failed
    run ends in its termination summary, not in a phase)."""

    INITIALIZING = "initializing"
    GENERATING_CLASS_IMAGES = "generating_class_images"
    TRAINING = "training"
    EXPORTING = "exporting"
    SUCCEEDED = "succeeded"


TRAINER_PHASES = tuple(TrainerPhase)
