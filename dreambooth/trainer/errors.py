"""Errors the trainer reports to users: each carries the exit code the operator maps."""

from __future__ import annotations

from dreambooth.api.exitcodes import ExitCode, exit_reason


class TrainerError(Exception):
    """A failure with a message that says what is wrong and what to do about it."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def reason(self) -> str:
        """CamelCase reason for Kubernetes conditions, e.g. ``BadData``."""
        return exit_reason(self.exit_code)


class ConfigError(TrainerError):
    exit_code = ExitCode.INVALID_CONFIG


class DataError(TrainerError):
    exit_code = ExitCode.BAD_DATA


class ModelError(TrainerError):
    exit_code = ExitCode.BAD_MODEL


class GpuUnavailableError(TrainerError):
    exit_code = ExitCode.GPU_UNAVAILABLE


class StorageAuthError(TrainerError):
    exit_code = ExitCode.STORAGE_AUTH


class NotFoundError(TrainerError):
    exit_code = ExitCode.NOT_FOUND


class StorageUnavailableError(TrainerError):
    exit_code = ExitCode.STORAGE_UNAVAILABLE


class Preempted(TrainerError):
    exit_code = ExitCode.PREEMPTED
