"""The UNet training step of the GPU bench: random-weight UNets at their real sizes.

Run as a child of ``bench/gpu_bench.py`` (one process per group of rows; each row prints
one JSON line as soon as it is measured). No text encoder or VAE: their outputs are
random tensors of the real shapes (77 tokens of the cross-attention width; SDXL's pooled
text embedding and its six size/crop ids; latents of 4 channels at 1/8 of the image side),
which is what the trainer feeds the UNet once text embeddings and latents are cached.

The trained parts, the frozen parts' dtype, LoRA (rank and target modules), gradient
checkpointing and the optimizer are set up by the trainer's own code
(``trainables.select``, ``phases.build_optimizer``) from a job spec, so the rows measure the
trainer's recipe, not a look-alike. Every row: bf16 autocast, fp32 master weights,
gradient clipping, the optimizer step.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

#: SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json; diffusers' defaults
#: for the rest): 859.5 M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "act_fn": "silu",
}

#: SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json):
#: 2,567.5 M parameters. The added conditioning is the pooled text embedding (1280) plus
#: six size/crop ids, each embedded in 256: 1280 + 6 x 256 = 2816.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "act_fn": "silu",
}

#: --cpu-smoke: the same two architectures, tiny (the SD one is dreambooth.trainer.tiny's
#: UNet; the SDXL one follows diffusers' own SDXL pipeline tests).
TINY_SD15_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
TINY_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 32 pooled + 6 x 8
}

TEXT_TOKENS = 77


@dataclass(frozen=True)
class Model:
    key: str
    label: str
    config: dict
    pixels: int  # image side; latents are pixels / 8

    @property
    def sdxl(self) -> bool:
        return self.config.get("addition_embed_type") == "text_time"


def models(smoke: bool) -> dict[str, Model]:
    if smoke:
        return {
            "sd15": Model("sd15", "SD 1.5 UNet (tiny)", TINY_SD15_UNET, 64),
            "sdxl": Model("sdxl", "SDXL UNet (tiny)", TINY_SDXL_UNET, 64),
        }
    return {"sd15": Model("sd15", "SD 1.5 UNet", SD15_UNET, 512), "sdxl": Model("sdxl", "SDXL UNet", SDXL_UNET, 1024)}


@dataclass(frozen=True)
class Row:
    """One measured configuration. ``compile``: off, full (``torch.compile`` of the whole
    UNet) or regional (only its repeated ``BasicTransformerBlock``s, diffusers'
    ``compile_repeated_blocks``)."""

    model: str
    batch: int
    method: str = "full"  # full | lora
    optimizer: str = "adamw"  # adamw | adamw8bit
    compile: str = "off"
    checkpointing: bool = False

    @property
    def key(self) -> str:
        return (
            f"{self.model} b{self.batch} {self.method} {self.optimizer} compile={self.compile}"
            f"{' ckpt' if self.checkpointing else ''}"
        )


def plan() -> list[list[Row]]:
    """The rows, in groups (one process each), most important first: a time budget cuts
    the last ones. The same plan runs full-size on a GPU and tiny with --cpu-smoke.

    - Batch 1 and 4, full fine-tune and LoRA, for both models: the recipes people run.
    - Gradient checkpointing and 8-bit AdamW where they matter, on full fine-tunes: SD 1.5
      at batch 4 (the blog's recipe), SDXL at batch 4 (checkpointing) and batch 1 with both
      (the leanest full SDXL fine-tune: does it fit a 24/48 GB card?). LoRA trains ~1 % of
      the weights, so 8-bit optimizer state saves nothing there.
    - SDXL full at batch 4 without checkpointing comes last in its group: it may well not
      fit even in an H200 (weights + gradients + AdamW alone are 41 GB), and an OOM is a
      result.
    - Compile: one row per model, against its eager twin; each costs a compilation of the
      training graph (tens of seconds to minutes), so they run last. SD 1.5 compiles whole;
      SDXL compiles regionally (its 70 transformer blocks are the same block: one
      compilation serves them all), which bounds the compile time within the budget.
    """
    sd = [
        Row("sd15", 1),
        Row("sd15", 4),
        Row("sd15", 4, checkpointing=True),
        Row("sd15", 4, optimizer="adamw8bit"),
        Row("sd15", 1, "lora"),
        Row("sd15", 4, "lora"),
    ]
    xl = [
        Row("sdxl", 1),
        Row("sdxl", 1, "lora"),
        Row("sdxl", 4, "lora"),
        Row("sdxl", 1, optimizer="adamw8bit", checkpointing=True),
        Row("sdxl", 4, checkpointing=True),
        Row("sdxl", 4),
    ]
    return [sd, xl, [Row("sd15", 4, compile="full")], [Row("sdxl", 4, "lora", compile="regional")]]


# --------------------------------------------------------------------------- measuring


def job_spec(row: Row, gpus: int):
    """The trainer's spec for ``row``: what select() and build_optimizer() read."""
    from dreambooth.api import Defaults, build_trainer_config, validate_job

    training = {
        "method": row.method,
        "optimizer": row.optimizer,
        "mixedPrecision": "bf16",
        "gradientCheckpointing": row.checkpointing,
        "batchSize": row.batch,
        "learningRate": 1e-4 if row.method == "lora" else 2e-6,
    }
    doc = {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "gpu-bench", "namespace": "bench"},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": "file:///unused/model"},
            "instance": {"uri": "file:///unused/photos", "prompt": "a photo of zwx toy cat"},
            "training": training,
            "output": {"uri": "file:///unused/out"},
            "resources": {"gpusPerNode": gpus},
        },
    }
    return build_trainer_config(validate_job(doc), Defaults(output_root="file:///unused")).spec


class Inputs:
    """Random latents, noise, timesteps and text conditioning of the real shapes."""

    def __init__(self, model: Model, batch: int, device) -> None:
        import torch

        side, cfg = model.pixels // 8, model.config
        g = torch.Generator(device="cpu").manual_seed(0)
        self.latents = torch.randn(batch, 4, side, side, generator=g).to(device)
        self.target = torch.randn(batch, 4, side, side, generator=g).to(device)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.cond = torch.randn(batch, TEXT_TOKENS, cfg["cross_attention_dim"], generator=g).to(device)
        self.added = None
        if model.sdxl:
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            ids = [model.pixels, model.pixels, 0, 0, model.pixels, model.pixels]  # orig size, crop, target
            self.added = {
                "text_embeds": torch.randn(batch, pooled, generator=g).to(device),
                "time_ids": torch.tensor([ids] * batch, dtype=torch.float32).to(device),
            }


class Step:
    """One training step as the trainer's loop does it (loss on the UNet's prediction,
    backward, clipping, optimizer step), on fixed inputs."""

    def __init__(self, unet, forward, optimizer, params, inputs: Inputs, device_type: str) -> None:
        self.unet, self.forward, self.optimizer, self.params = unet, forward, optimizer, params
        self.inputs, self.device_type = inputs, device_type

    def loss(self, batch: int | None = None):
        import torch
        import torch.nn.functional as F

        x = self.inputs
        sl = slice(0, batch)
        added = {k: v[sl] for k, v in x.added.items()} if x.added else None
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            pred = self.forward(x.latents[sl], x.timesteps[sl], x.cond[sl], added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), x.target[sl])

    def __call__(self):
        import torch

        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def count_flops(step: Step) -> int:
    """FLOPs of one forward + backward at batch 1, counted by torch's FlopCounterMode under
    the math SDPA kernel (FlopCounterMode counts fused attention kernels as zero on some
    backends, e.g. the CPU's flash kernel; the math kernel decomposes attention into the
    matmuls it counts). Without gradient checkpointing: model FLOPs, no recomputation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = step.unet
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step.loss(batch=1).backward()
    finally:
        step.optimizer.zero_grad(set_to_none=True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return int(counter.get_total_flops())


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model: Model, row: Row, *, warmup: int, steps: int, smoke: bool, flops_cache: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from gpu_common import peak_memory_bytes, reset_peak_memory

    from dreambooth.trainer import trainables
    from dreambooth.trainer.devices import allow_tf32
    from dreambooth.trainer.phases import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allow_tf32(device.type)  # as the trainer does on CUDA
    spec = job_spec(row, gpus=1 if device.type == "cuda" else 0)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**model.config)  # random fp32 weights, built on the device
    params_total = sum(p.numel() for p in unet.parameters())
    chosen = trainables.select(spec, unet, [torch.nn.Identity()], device=device, dtype=torch.bfloat16)
    optimizer = build_optimizer(spec, chosen.groups)
    params = [p for g in chosen.groups for p in g["params"]]
    module = chosen.denoiser
    step = Step(module, module, optimizer, params, Inputs(model, row.batch, device), device.type)
    key = (model.key, row.method)
    if key not in flops_cache:  # counted on the eager module, before any compilation
        flops_cache[key] = count_flops(step)
    flops = flops_cache[key] * row.batch  # every counted op is linear in the batch
    if row.compile != "off":
        kwargs = {"backend": "eager"} if smoke else {}  # smoke: dynamo only (inductor: minutes here)
        if row.compile == "full":
            step.forward = torch.compile(module, **kwargs)
        else:
            module.compile_repeated_blocks(**kwargs)
    gc.collect()
    reset_peak_memory()  # the window holds weights, optimizer state, activations, gradients

    synchronize()
    start = time.perf_counter()
    loss = step()
    synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    loss = float(loss)
    peak = peak_memory_bytes()
    times.sort()
    seconds = times[len(times) // 2]
    result = {
        "status": "ok" if math.isfinite(loss) else f"error: loss {loss}",
        "seconds_per_step": seconds,
        "steps_per_s": 1 / seconds,
        "images_per_s": row.batch / seconds,
        "first_step_s": first,
        "flops_per_step": flops,
        "peak_memory_bytes": peak,
        "params": params_total,
        "trainable": sum(p.numel() for p in params),
        "loss": loss,
        "timed_steps": steps,
    }
    del step, optimizer, chosen, unet, module, params
    return result


def run_group(rows: list[Row], *, smoke: bool, warmup: int, steps: int) -> None:
    """Measure ``rows`` in this process; one JSON line on stdout per row."""
    import torch

    flops_cache: dict = {}
    known = models(smoke)
    for row in rows:
        try:
            result = measure(known[row.model], row, warmup=warmup, steps=steps, smoke=smoke, flops_cache=flops_cache)
        except torch.cuda.OutOfMemoryError as err:
            first = str(err).split("\n")[0]
            result = {"status": "OOM", "detail": first[:200]}
        except Exception as err:  # noqa: BLE001  (a row's failure is a result; the next row runs)
            message = " ".join(str(err).split())  # one line for the table
            result = {"status": f"error: {type(err).__name__}: {message}"[:240]}
            import traceback

            traceback.print_exc(file=sys.stderr)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if row.compile != "off":
            torch._dynamo.reset()
        print(json.dumps({"row": asdict(row), **result}), flush=True)
