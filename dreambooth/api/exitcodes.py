"""Trainer exit codes: the contract between the trainer and the operator's podFailurePolicy.

A pod that exits with a code in :data:`DO_NOT_RETRY` fails the whole Job at once (retrying
cannot help: the input is wrong). Any other non-zero code is retried up to ``backoffLimit``
and the trainer resumes from its newest checkpoint.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: an unexpected error (a bug, a CUDA fault): retried
    UNEXPECTED = 1
    #: the trainer config or job spec is invalid
    INVALID_CONFIG = 10
    #: instance/class data is unusable: no images, an unreadable image, a bad resolution
    BAD_DATA = 11
    #: storage refused our credentials or denied access
    STORAGE_AUTH = 12
    #: a bucket, prefix or model that the job names does not exist
    NOT_FOUND = 13
    #: the base model is not a diffusers Stable Diffusion layout we can train
    BAD_MODEL = 14
    #: the job asks for GPUs but the pod sees no CUDA device (driver, container runtime or
    #: device plugin on the node; or a CPU-only torch in the image)
    GPU_UNAVAILABLE = 15
    #: storage or the model hub is unreachable or failed mid-transfer: retried
    STORAGE_UNAVAILABLE = 20
    #: stopped by SIGTERM (preemption, suspend, node drain) after saving state: retried
    PREEMPTED = 21


def exit_reason(code: int | None) -> str | None:
    """The CamelCase reason of an exit code, e.g. ``BadData`` for 11 (what the trainer puts
    in its termination summary and the operator shows); None for a code not ours."""
    try:
        member = ExitCode(code)
    except ValueError:
        return None
    return "".join(part.capitalize() for part in member.name.split("_"))


DO_NOT_RETRY: frozenset[ExitCode] = frozenset(
    {
        ExitCode.INVALID_CONFIG,
        ExitCode.BAD_DATA,
        ExitCode.STORAGE_AUTH,
        ExitCode.NOT_FOUND,
        ExitCode.BAD_MODEL,
        ExitCode.GPU_UNAVAILABLE,
    }
)
