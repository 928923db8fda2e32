"""The DreamBoothJob API (``dreambooth.io/v1alpha1``): types, presets, validation, CRD.

Imports neither kopf nor torch: the operator, the trainer and the CLI all build on it.
"""

from dreambooth.api.config import Defaults, TrainerConfig, build_trainer_config
from dreambooth.api.job import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    DreamBoothJob,
    FieldIssue,
    SpecError,
    validate_job,
    validate_spec,
)
from dreambooth.api.presets import Preset
from dreambooth.api.resolve import effective_spec
from dreambooth.api.spec import DreamBoothJobSpec
from dreambooth.api.status import DreamBoothJobStatus, Phase

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Defaults",
    "DreamBoothJob",
    "DreamBoothJobSpec",
    "DreamBoothJobStatus",
    "FieldIssue",
    "Phase",
    "Preset",
    "SpecError",
    "TrainerConfig",
    "build_trainer_config",
    "effective_spec",
    "validate_job",
    "validate_spec",
]
