"""The embedded default that ``dreambooth demo`` (README's first command) trains.

No model weights can be downloaded everywhere, so the demo builds a tiny
Stable-Diffusion-shaped model with random weights and draws four "toy cat" photos, then
runs a real DreamBooth job on them: the same trainer, checkpoints, samples and exports as
a job on a cluster, small enough for a laptop CPU.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

DEMO_PROMPT = "a photo of zwx toy cat"
RESOLUTION = 64


def demo_job_document(root: Path) -> dict[str, Any]:
    base = root.resolve().as_uri()
    return {
        "apiVersion": "dreambooth.io/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "demo"},
        "spec": {
            "preset": "object",
            "baseModel": {"uri": f"{base}/base-model"},
            "instance": {"uri": f"{base}/instance", "prompt": DEMO_PROMPT},
            # A random tiny model learns visibly only at a much higher LR than real SD.
            "training": {"steps": 60, "batchSize": 2, "resolution": RESOLUTION, "learningRate": 1e-3},
            "validation": {
                "prompts": [DEMO_PROMPT, "a photo of zwx toy cat on the beach"],
                "inferenceSteps": 20,
                "imagesPerPrompt": 2,
                "everySteps": 30,
            },
            "checkpointing": {"everySteps": 20, "keep": 2},
            "output": {"uri": f"{base}/output"},
            "resources": {"gpusPerNode": 0},
        },
    }


def draw_toy_cats(folder: Path, count: int = 4, size: int = RESOLUTION * 2, seed: int = 0) -> list[Path]:
    """Simple synthetic photos of one orange "toy cat" on varied backgrounds."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        bg = tuple(rng.randint(60, 230) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        cx, cy, r = size // 2 + rng.randint(-8, 8), size // 2 + rng.randint(-4, 8), size // 4
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(235, 140, 40))
        for side in (-1, 1):  # ears
            d.polygon(
                [(cx + side * r // 2, cy - r + 4), (cx + side * r, cy - r - r // 2), (cx + side * r, cy - r // 3)],
                fill=(235, 140, 40),
            )
        for side in (-1, 1):  # eyes
            d.ellipse((cx + side * r // 3 - 4, cy - 6, cx + side * r // 3 + 4, cy + 2), fill=(20, 20, 20))
        path = folder / f"toy-cat-{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def prepare_demo(root: Path) -> dict[str, Any]:
    """Create (once) the tiny base model and photos under ``root``; return the job."""
    from dreambooth.trainer.tiny import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base-model" / "model_index.json").is_file():
        build_tiny_model(root / "base-model", resolution=RESOLUTION)
    if not list((root / "instance").glob("*.png")):
        draw_toy_cats(root / "instance")
    return demo_job_document(root)
