"""Training throughput and memory of the trainer's loop against a bare optimizer step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_throughput.py [--steps 30]

For each config (tiny SD-shaped model, resolution 64 and 128, batch 1; then the recipe's
options, and the tiny SDXL- and SD3-shaped models full and LoRA, at 128) it runs, in a fresh process
each: the bare UNet forward + backward + AdamW step on fixed inputs, and the
trainer's own ``Loop.run_step`` (data sampling, latent sampling, text embeddings, noise,
loss, clipping, LR schedule, loss reduction). It prints steps/s, images/s, the loop's
overhead over the bare step, and peak RSS next to what the weights and AdamW state need.
Results and the command are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


VARIANTS: dict[str, dict] = {
    "default (UNet, cached latents)": {},
    "+ text encoder": {"trainTextEncoder": True},
    "latents encoded every step": {"_encode_every_step": True},
    "LoRA rank 4": {"method": "lora", "learningRate": 1e-4},
    "+ gradient checkpointing": {"gradientCheckpointing": True},
    "8-bit AdamW": {"optimizer": "adamw8bit"},
    # photos of three aspect ratios, each micro-batch from its own bucket, mirrored at random
    "buckets, 3 aspect ratios, random flip": {"_mixed_photos": True, "randomFlip": True},
}
#: the tiny SDXL-shaped model (two text encoders, text_time UNet), same resolution and batch;
#: buckets on (SDXL's default; the square toy photos all fall in one) unless said
SDXL_VARIANTS: dict[str, dict] = {
    "SDXL full (UNet, cached latents)": {"_family": "sdxl", "method": "full"},
    "SDXL full, buckets off": {"_family": "sdxl", "method": "full", "buckets": {"enabled": False}},
    "SDXL LoRA rank 4": {"_family": "sdxl", "method": "lora", "learningRate": 1e-4},
    "SDXL LoRA rank 4 + both text encoders": {
        "_family": "sdxl",
        "method": "lora",
        "learningRate": 1e-4,
        "lora": {"textEncoder": True},
    },
}

#: the tiny SD3-shaped model (MMDiT transformer, flow matching, CLIP-L/G + T5), same
#: resolution and batch: LoRA as its presets train it, T5 kept and dropped, and a full
#: fine-tune of the transformer
SD3_VARIANTS: dict[str, dict] = {
    "SD3 LoRA rank 4 (T5 kept)": {"_family": "sd3", "method": "lora", "learningRate": 1e-4},
    "SD3 LoRA rank 4, T5 dropped": {"_family": "sd3", "method": "lora", "learningRate": 1e-4, "t5": "drop"},
    "SD3 LoRA rank 4 + CLIP-L/G adapters": {
        "_family": "sd3",
        "method": "lora",
        "learningRate": 1e-4,
        "lora": {"textEncoder": True},
    },
    "SD3 full (transformer)": {"_family": "sd3", "method": "full", "_formats": ["diffusers"]},
}

#: (width, height) of the photos of the bucket variant, in units of the resolution
MIXED_PHOTOS = [(2.0, 1.2), (1.2, 2.0), (1.5, 1.5), (2.0, 1.2)]


class EncodeEveryStep:
    """What the loop would do without the latent cache: run the VAE encoder every step."""

    def __init__(self, vae, examples, cached) -> None:
        import torch

        self.vae, self.prompts, self.scaling, self.sizes = vae, cached.prompts, cached.scaling, cached.sizes
        self.pixels = torch.stack([e.pixels for e in examples])

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, indices, gens):
        import torch

        from dreambooth.trainer.loop import randn

        with torch.no_grad():
            dist = self.vae.encode(self.pixels[indices]).latent_dist
            return (dist.mean + dist.std * randn(dist.mean.shape[1:], gens, dist.mean.device)) * self.scaling


def measure(resolution: int, steps: int, warmup: int = 3, variant: str | None = None) -> dict:
    import torch

    from dreambooth.api import Defaults, build_trainer_config, validate_job
    from dreambooth.demo import demo_job_document, draw_toy_cats
    from dreambooth.trainer.context import Context
    from dreambooth.trainer.devices import make_accelerator
    from dreambooth.trainer.families import load_components
    from dreambooth.trainer.inputs import load_instance_examples
    from dreambooth.trainer.metrics import TrainerMetrics
    from dreambooth.trainer.phases import build_loop, shared_parts
    from dreambooth.trainer.storage import open_storage
    from dreambooth.trainer.tiny import build_tiny_model, build_tiny_sdxl
    from dreambooth.trainer.tiny_sd3 import build_tiny_sd3

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    options = dict({**VARIANTS, **SDXL_VARIANTS, **SD3_VARIANTS}.get(variant or "", {}))
    encode_every_step = options.pop("_encode_every_step", False)
    family = options.pop("_family", "sd")
    builders = {"sd": build_tiny_model, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3}
    builders[family](root / "base-model", resolution=resolution)
    formats = options.pop("_formats", None)
    draw_toy_cats(root / "instance", size=resolution * 2)
    doc = demo_job_document(root)
    doc["spec"]["baseModel"]["family"] = family
    if options.pop("_mixed_photos", False):
        draw_mixed_photos(root / "instance", resolution)
        # the tiny model downsamples by 16: buckets of about resolution^2 pixels on that step
        options["buckets"] = {"enabled": True, "minSide": resolution // 2, "maxSide": 2 * resolution, "step": 16}
    doc["spec"]["training"].update(steps=steps + warmup, batchSize=1, resolution=resolution, **options)
    doc["spec"]["checkpointing"] = {"everySteps": steps + warmup}
    doc["spec"]["validation"] = {"enabled": False}
    if formats:
        doc["spec"]["output"]["formats"] = formats
    config = build_trainer_config(validate_job(doc), Defaults(output_root=root.as_uri()))
    baseline_rss = peak_rss()

    bare_s = bare_step_seconds(root / "base-model", config, resolution, steps, warmup)
    gc.collect()

    # --- the trainer's loop (fresh model and optimizer) ----------------------------------
    accelerator = make_accelerator(config.spec)
    ctx = Context(
        config, root / "work", accelerator, None, open_storage(config.output_uri), TrainerMetrics(), threading.Event()
    )
    components = load_components(root / "base-model", "bench")
    examples = load_instance_examples(ctx, components)
    loop = build_loop(ctx, components, shared_parts(ctx, components, examples, None))
    if encode_every_step:
        loop.instances = EncodeEveryStep(components.vae, examples, loop.instances)
    step = iter(range(10**6))
    loop_s = timed(lambda: loop.run_step(next(step)), steps, warmup)

    trainable = sum(p.numel() * p.element_size() for p in loop.parameters)
    frozen = sum(
        p.numel() * p.element_size() for m in (components.vae, *components.text_encoders) for p in m.parameters()
    )
    adam_state = 2 * trainable
    return {
        "variant": variant,
        "resolution": resolution,
        "steps": steps,
        "bare_step_ms": 1000 * bare_s,
        "loop_step_ms": 1000 * loop_s,
        "steps_per_s": 1 / loop_s,
        "images_per_s": 1 / loop_s,  # batch 1
        "overhead_pct": 100 * (loop_s - bare_s) / bare_s,
        "peak_rss_mb": peak_rss() / 2**20,
        "baseline_rss_mb": baseline_rss / 2**20,
        "weights_and_adam_mb": (2 * trainable + frozen + 2 * adam_state + trainable) / 2**20,
    }


def draw_mixed_photos(folder: Path, resolution: int) -> None:
    """The toy cats resized to landscape, portrait and square photos (replacing the squares)."""
    from PIL import Image

    squares = sorted(folder.glob("*.png"))
    for path, (w, h) in zip(squares, MIXED_PHOTOS, strict=False):
        with Image.open(path) as img:
            img.resize((round(w * resolution), round(h * resolution))).save(path)


def bare_step_seconds(model: Path, config, resolution: int, steps: int, warmup: int) -> float:
    """The UNet forward + backward + AdamW step (the trainer's optimizer) on fixed inputs."""
    import torch

    from dreambooth.trainer.families import SampleSize, load_components
    from dreambooth.trainer.phases import build_optimizer

    components = load_components(model, "bench")
    family, unet = components.family, components.denoiser.train()
    family.configure(components, config.spec.training, "bench")  # SD3: T5 kept or dropped
    opt = build_optimizer(config.spec, [{"params": list(unet.parameters()), "lr": 1e-4}])
    side = resolution // 8
    latents = torch.randn(1, unet.config.in_channels, side, side)  # SD3: 16 latent channels
    with torch.no_grad():  # the family's conditioning (SDXL: both encoders, pooled, time ids; SD3: + T5)
        cond = family.encode(components.tokenizers, components.text_encoders, ["a photo of zwx toy cat"], "cpu")
    sizes = [SampleSize((resolution, resolution), (0, 0), (resolution, resolution))]
    t = torch.tensor([500])

    def bare() -> None:
        loss = torch.nn.functional.mse_loss(family.predict(unet, latents, t, cond, sizes), latents)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(bare, steps, warmup)


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]  # median: robust to a stray slow step


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(resolution: int, steps: int, variant: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", str(resolution), "--steps", str(steps)]
    if variant:
        cmd += ["--variant", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, variant=args.variant)))
        return
    print(f"torch threads: {os.environ['OMP_NUM_THREADS']}, batch 1, {args.steps} timed steps (median)\n")
    header = (
        "resolution",
        "bare step ms",
        "loop step ms",
        "overhead",
        "steps/s",
        "images/s",
        "peak RSS MB",
        "RSS after imports MB",
        "weights+grads+AdamW MB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for resolution in (64, 128):
        r = one(resolution, args.steps)
        print(
            f"| {r['resolution']} | {r['bare_step_ms']:.1f} | {r['loop_step_ms']:.1f} | {r['overhead_pct']:+.1f}% "
            f"| {r['steps_per_s']:.1f} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['baseline_rss_mb']:.0f} | {r['weights_and_adam_mb']:.1f} |"
        )
    print("\nrecipe options at resolution 128:\n")
    print("| variant | loop step ms | vs default | steps/s | peak RSS MB | trained+AdamW MB |")
    print("|---|---|---|---|---|---|")
    base = None
    for variant in VARIANTS:
        r = one(128, args.steps, variant)
        base = base or r["loop_step_ms"]
        print(
            f"| {variant} | {r['loop_step_ms']:.1f} | {r['loop_step_ms'] / base:.2f}x | {r['steps_per_s']:.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['weights_and_adam_mb']:.1f} |"
        )
    print("\ntiny SDXL and SD3 at resolution 128 (vs: the SD default above, same run):\n")
    print(
        "| variant | bare step ms | loop step ms | overhead | vs SD default | steps/s | peak RSS MB "
        "| trained+AdamW MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant in (*SDXL_VARIANTS, *SD3_VARIANTS):
        r = one(128, args.steps, variant)
        print(
            f"| {variant} | {r['bare_step_ms']:.1f} | {r['loop_step_ms']:.1f} | {r['overhead_pct']:+.1f}% "
            f"| {r['loop_step_ms'] / base:.2f}x | {r['steps_per_s']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['weights_and_adam_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
