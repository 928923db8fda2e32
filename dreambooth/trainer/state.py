"""What a checkpoint folder holds, so that a resumed run continues exactly.

``trainable.safetensors`` the trained parameters (only those the optimizer updates: the
whole UNet for full fine-tuning, only adapters for LoRA), ``optimizer.pt``,
``lr_scheduler.pt``, ``rng.pt`` and ``state.json`` (step and run facts). The data order
and the noise of every step are pure functions of (seed, step), so they need no state.

Reading one back never holds the whole checkpoint in CPU memory (every process of a node
resumes at once: 8 x 12 GB for a full SD 1.5 fine-tune with its text encoder): trained
weights are copied into the parameters one tensor at a time from the memory-mapped
safetensors file, and the optimizer and extra states are memory-mapped (``torch.load(...,
mmap=True)``), so each tensor reaches its device from the page cache, which all processes
of a node share.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth.trainer.errors import TrainerError

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
LR_SCHEDULER = "lr_scheduler.pt"
RNG = "rng.pt"
STATE = "state.json"


def trained_parameters(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer):
    """``(qualified name, parameter)`` of every parameter the optimizer updates."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if id(param) in owned:
                yield f"{prefix}.{name}", param


def write(
    folder: Path,
    *,
    step: int,
    modules,
    optimizer,
    lr_scheduler,
    facts: dict[str, Any],
    extras: dict[str, Any] | None = None,
) -> None:
    """Write the state; ``extras`` are further objects with ``state_dict()`` (e.g. EMA)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trained_parameters(modules, optimizer)}
    save_file(tensors, str(folder / TRAINABLE), metadata={"step": str(step)})
    torch.save(optimizer.state_dict(), folder / OPTIMIZER)
    torch.save(lr_scheduler.state_dict(), folder / LR_SCHEDULER)
    for name, obj in (extras or {}).items():
        torch.save(obj.state_dict(), folder / f"{name}.pt")
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        folder / RNG,
    )
    (folder / STATE).write_text(json.dumps({"step": step, **facts}, indent=1))


def read(
    folder: Path, *, modules, optimizer, lr_scheduler, facts: dict[str, Any], extras: dict[str, Any] | None = None
) -> int:
    """Restore everything from ``folder``; returns the step to continue from.

    ``facts`` must match what the checkpoint was written with (e.g. the number of
    processes): a checkpoint of a different run setup cannot continue exactly.
    """
    state = json.loads((folder / STATE).read_text())
    changed = {k: (state.get(k), v) for k, v in facts.items() if state.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise TrainerError(
            f"the checkpoint at step {state['step']} was written by a different setup ({detail}); "
            "restore the job's settings or delete its checkpoints/ to start over"
        )
    device = read_weights(folder, modules=modules, optimizer=optimizer)
    # the optimizer moves each state tensor to its parameter's device as it loads it
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location="cpu", mmap=True, weights_only=False))
    lr_scheduler.load_state_dict(torch.load(folder / LR_SCHEDULER, weights_only=False))
    read_extras(folder, extras or {}, device=device)
    rng = torch.load(folder / RNG, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def read_weights(folder: Path, *, modules, optimizer) -> torch.device:
    """Copy the checkpoint's trained weights into the parameters (one tensor at a time);
    returns their device."""
    step = json.loads((folder / STATE).read_text())["step"]
    params = dict(trained_parameters(modules, optimizer))
    device = next(iter(params.values())).device if params else torch.device("cpu")
    with safe_open(str(folder / TRAINABLE), framework="pt", device=str(device)) as saved:
        names = set(saved.keys())
        if names != set(params):
            missing = sorted(set(params) - names)[:3]
            raise TrainerError(
                f"the checkpoint at step {step} does not match the model being trained "
                f"(e.g. {missing or sorted(names - set(params))[:3]}): delete its checkpoints/ "
                "to start over"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved.get_tensor(name))
    return device


def read_extras(folder: Path, extras: dict[str, Any], *, device=None) -> None:
    """Load every extra state the checkpoint has (e.g. a learned token across phases) onto
    ``device`` (the trained parameters'): diffusers' EMAModel keeps the tensors it is given,
    and its next step would mix CPU copies with CUDA parameters."""
    for name, obj in extras.items():
        path = folder / f"{name}.pt"
        if path.is_file():
            obj.load_state_dict(torch.load(path, map_location=device or "cpu", mmap=True, weights_only=False))
