"""What a checkpoint folder holds, so that a resumed run continues exactly.

``trainable.safetensors`` the trained parameters (only those the optimizer updates: the
whole UNet for full fine-tuning, only adapters for LoRA), ``optimizer.pt``,
``lr_scheduler.pt``, ``rng.pt`` and ``state.json`` (step and run facts). The data order
and the noise of every step are pure functions of (seed, step), so they need no state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def write(folder: Path, *, step: int, modules, optimizer, lr_scheduler, facts: dict[str, Any],
          extras: dict[str, Any] | None = None) -> None:
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


def read(folder: Path, *, modules, optimizer, lr_scheduler, facts: dict[str, Any],
         extras: dict[str, Any] | None = None) -> int:
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
    tensors = load_file(str(folder / TRAINABLE))
    params = dict(trained_parameters(modules, optimizer))
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        raise TrainerError(
            f"the checkpoint at step {state['step']} does not match the model being trained "
            f"(e.g. {missing or sorted(set(tensors) - set(params))[:3]}): delete its checkpoints/ "
            "to start over"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(folder / LR_SCHEDULER, weights_only=False))
    read_extras(folder, extras or {})
    rng = torch.load(folder / RNG, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def read_extras(folder: Path, extras: dict[str, Any]) -> None:
    """Load every extra state the checkpoint has (e.g. a learned token across phases)."""
    for name, obj in extras.items():
        path = folder / f"{name}.pt"
        if path.is_file():
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
