"""Which devices a run trains on: GPUs when the job asks for them (or a clear failure),
collectives with the job's timeout, TF32 for the fp32 parts on CUDA."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from dreambooth.api import validate_job
from dreambooth.trainer.devices import allow_tf32, check_gpus, process_group_kwargs
from dreambooth.trainer.errors import GpuUnavailableError
from tests.support.trainer import job_document


def spec(gpus: int):
    doc = job_document("file:///m/", "file:///p/", "file:///o/", steps=2, every=2, resources={"gpusPerNode": gpus})
    return validate_job(doc).spec


SEEN = {  # (gpusPerNode, available, device count, local rank, torch CUDA) -> message part or None
    "no GPUs asked for": ((0, False, 0, 0, None), None),
    "GPUs asked, CPU-only torch": ((1, False, 0, 0, None), "CPU-only build"),
    "GPUs asked, no driver": ((2, False, 0, 0, "12.8"), "sees 0 CUDA devices"),
    "fewer devices than processes": ((2, True, 1, 1, "12.8"), "process 1 of this pod sees 1 CUDA devices"),
    "enough devices": ((2, True, 2, 1, "12.8"), None),
}


@pytest.mark.parametrize("case", SEEN)
def test_gpu_check(case, monkeypatch):
    (gpus, available, count, rank, cuda), expected = SEEN[case]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    if expected is None:
        check_gpus(spec(gpus), available=available, count=count, local_rank=rank, cuda_version=cuda)
        return
    with pytest.raises(GpuUnavailableError) as err:
        check_gpus(spec(gpus), available=available, count=count, local_rank=rank, cuda_version=cuda)
    assert expected in str(err.value) and "resources.gpusPerNode" in str(err.value)
    assert err.value.reason == "GpuUnavailable"


def test_tf32_only_on_cuda():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not allow_tf32("cpu") and not torch.backends.cuda.matmul.allow_tf32
        assert allow_tf32("cuda") and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("seconds", [5, 600, 1800])
def test_the_collective_timeout_always_reaches_the_process_group(seconds):
    """accelerate drops a timeout equal to NCCL's default; gloo would then wait 30 minutes."""
    assert process_group_kwargs(seconds).to_kwargs() == {"timeout": timedelta(seconds=seconds)}


# --- frozen text encoders wait off the accelerator ---------------------------------------


def test_frozen_text_encoders_are_parked_only_where_they_would_hold_accelerator_memory():
    from dreambooth.trainer.phases import parking

    assert parking(torch.device("cuda", 0), trains_text_encoders=False) == torch.device("cpu")
    assert parking(torch.device("cuda", 0), trains_text_encoders=True) is None  # trained: they stay
    assert parking(torch.device("cpu"), trains_text_encoders=False) is None  # nowhere better to go


@pytest.mark.parametrize("parked", [False, True])
def test_text_encoders_are_on_the_device_exactly_while_they_encode(parked, tiny_sd3_dir):
    """The prompt cache of a run that trains no text encoder: each encoder is moved to the
    compute device for an encoding of new prompts (or a sampling block) and back to its park
    after it; cached prompts and steps move nothing; the embeddings are the same either way.
    (On this CPU both places are the CPU: the moves are what is observed.)"""
    from dreambooth.trainer.families import load_components
    from dreambooth.trainer.loop import PromptEncoder

    components = load_components(tiny_sd3_dir, "tiny")
    device, park = torch.device("cpu"), torch.device("cpu") if parked else None
    moves: list[tuple[int, torch.device]] = []
    for i, text_encoder in enumerate(components.text_encoders):

        def to(target, _i=i, _to=text_encoder.to):
            moves.append((_i, target))
            return _to(target)

        text_encoder.to = to
    prompts = PromptEncoder(components.family, components.tokenizers, components.text_encoders, device, park=park)
    every = len(components.text_encoders)

    first = prompts(["a photo of zwx toy cat"], training=False)
    expected = [(i, device) for i in range(every)] + [(i, park) for i in range(every)] if parked else []
    assert moves == expected
    moves.clear()
    again = prompts(["a photo of zwx toy cat"] * 2, training=False)  # cached: nothing moves
    assert moves == [] and torch.equal(again.rows()[1].embeds, first.rows()[0].embeds)
    with prompts.on_device():  # sampling: the pipeline encodes its prompts itself
        assert moves == [(i, device) for i in range(every)] * parked
    assert moves == expected
    reference = PromptEncoder(components.family, components.tokenizers, components.text_encoders, device)
    assert torch.equal(reference(["a photo of zwx toy cat"], training=False).rows()[0].embeds, first.rows()[0].embeds)
