"""Processes and devices: the accelerator a run trains with.

A job that asks for GPUs trains on GPUs or not at all: a pod that sees no CUDA device
(driver, container runtime or device plugin trouble on its node; a CPU-only torch in the
image) fails with :class:`~dreambooth.trainer.errors.GpuUnavailableError` instead of
quietly training on its CPU. Collectives wait ``runPolicy.collectiveTimeoutSeconds``
(NCCL's own default is 10 minutes, gloo's 30). On CUDA, the fp32 parts of a step may use
TF32 tensor cores.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

from dreambooth.api.spec import DreamBoothJobSpec, MixedPrecision
from dreambooth.trainer.errors import ConfigError, GpuUnavailableError

log = logging.getLogger("dreambooth.trainer")


def check_gpus(
    spec: DreamBoothJobSpec, *, available: bool, count: int, local_rank: int, cuda_version: str | None
) -> None:
    """Raise :class:`GpuUnavailableError` when the job asks for GPUs this process cannot use."""
    wanted = spec.resources.gpus_per_node
    if wanted == 0:
        return
    visible = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES") if k in os.environ}
    seen = ", ".join(f"{k}={v!r}" for k, v in visible.items()) or "no CUDA_VISIBLE_DEVICES"
    if cuda_version is None:
        raise GpuUnavailableError(
            f"resources.gpusPerNode is {wanted} but this image's torch ({torch.__version__}) is a "
            "CPU-only build: use the trainer image built with CUDA (docs/deploy.md), or set "
            "resources.gpusPerNode: 0 to train on the CPU"
        )
    if not available or count <= local_rank:
        raise GpuUnavailableError(
            f"resources.gpusPerNode is {wanted} but process {local_rank} of this pod sees "
            f"{count if available else 0} CUDA devices ({seen}; torch built for CUDA "
            f"{cuda_version}): check the node's NVIDIA driver (nvidia-smi, at least the version "
            "this CUDA needs), the container runtime and the GPU device plugin, or set "
            "resources.gpusPerNode: 0 to train on the CPU"
        )


def allow_tf32(device_type: str) -> bool:
    """Let fp32 matmuls and convolutions use TF32 on CUDA (Ampere and newer): ~10 bits of
    mantissa for the fp32 parts, as PyTorch's own AMP recipes allow. Nothing on CPUs."""
    if device_type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def process_group_kwargs(seconds: int):
    """accelerate's handler for the collective timeout. Its ``to_kwargs`` drops a value equal
    to NCCL's default (600 s), which would leave gloo at its 30 minutes: always pass it."""
    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    return handler


def make_accelerator(spec: DreamBoothJobSpec):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_gpus(
        spec,
        available=torch.cuda.is_available(),
        count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        cuda_version=torch.version.cuda,
    )
    cpu = spec.resources.gpus_per_node == 0
    if cpu and spec.training.mixed_precision is MixedPrecision.FP16:
        raise ConfigError("training.mixedPrecision fp16 needs a GPU (resources.gpusPerNode >= 1): use no or bf16")
    accelerator = Accelerator(
        mixed_precision=spec.training.mixed_precision.value,
        cpu=cpu,
        kwargs_handlers=[process_group_kwargs(spec.run_policy.collective_timeout_seconds)],
    )
    expected = spec.resources.num_processes
    if accelerator.num_processes not in (1, expected):
        raise ConfigError(
            f"the trainer runs as {accelerator.num_processes} processes but the job asks for "
            f"{expected} (resources.nodes x gpusPerNode): launch it with accelerate launch "
            f"--num_processes {expected}"
        )
    if accelerator.num_processes != expected:
        log.warning("running as 1 process although the job asks for %d; the batch is unchanged", expected)
    if allow_tf32(accelerator.device.type):
        log.info("TF32 allowed for fp32 matmuls and convolutions on %s", torch.cuda.get_device_name())
    set_seed(spec.training.seed)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
