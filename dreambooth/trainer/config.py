"""Read the TrainerConfig the operator mounted (or ``dreambooth train`` wrote)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from dreambooth.api.config import TrainerConfig
from dreambooth.api.job import FieldIssue, SpecError, issues_from
from dreambooth.api.rules import violations
from dreambooth.trainer.errors import ConfigError


def load_config(path: Path) -> TrainerConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no trainer config at {path}: pass --config or set DREAMBOOTH_CONFIG") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the trainer config {path}: {err}") from None
    try:
        config = TrainerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(str(SpecError(issues_from(err, TrainerConfig), what="TrainerConfig"))) from None
    found = violations(config.spec)  # the cross-field rules, as validate_job checks them
    if found:
        issues = [FieldIssue(f"spec.{v.path}", v.message) for v in found]
        raise ConfigError(str(SpecError(issues, what="TrainerConfig")))
    return config
