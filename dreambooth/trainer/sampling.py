"""Sample grids: how a person judges a DreamBooth run (rows = prompts, columns = images).

The seed's finding: overfit models give noisy samples with PNDM/LMS; DDIM with up to 100
inference steps gives clean ones. DDIM at 100 steps is therefore the default sampler, and
the exported pipeline carries the same scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from dreambooth.api.spec import Sampler, ValidationSpec

LABEL_HEIGHT = 24
MAX_LABEL_CHARS = 80
LABEL_PAD = 4  # pixels left and right of a label


def scheduler_for(sampler: Sampler, config) -> object:
    """A diffusers inference scheduler of kind ``sampler`` built from the model's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
    )

    kinds = {
        Sampler.DDIM: DDIMScheduler,
        Sampler.PNDM: PNDMScheduler,
        Sampler.LMS: LMSDiscreteScheduler,
        Sampler.DPM: DPMSolverMultistepScheduler,
        Sampler.EULER: EulerDiscreteScheduler,
        Sampler.FLOW_EULER: FlowMatchEulerDiscreteScheduler,  # SD3's (validation refuses it elsewhere)
    }
    return kinds[Sampler(sampler)].from_config(config)


@torch.no_grad()
def generate(
    pipeline,
    validation: ValidationSpec,
    *,
    resolution: int,
    seed: int,
    device,
    rows: Sequence[int] | None = None,
    options: dict | None = None,
) -> list[list[Image.Image]]:
    """``imagesPerPrompt`` images for each prompt (or for the prompts numbered ``rows``), the
    same seed every time (comparable grids): prompt ``i`` draws from seed ``seed + i``, so a
    row is the same image whichever process draws it. ``options``: the family's further
    pipeline arguments (SD3: T5's prompt length)."""
    pipeline.set_progress_bar_config(disable=True)
    out = []
    for i in range(len(validation.prompts)) if rows is None else rows:
        prompt = validation.prompts[i]
        generator = torch.Generator(device=device).manual_seed(seed + i)
        result = pipeline(
            prompt,
            negative_prompt=validation.negative_prompt,
            num_images_per_prompt=validation.images_per_prompt,
            num_inference_steps=validation.inference_steps,
            guidance_scale=validation.guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
            **(options or {}),
        )
        out.append(list(result.images))
    return out


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], *, title: str = "") -> Image.Image:
    """A labelled grid: one row per label, images left to right; as wide as its longest
    label (prompts are often wider than a few small samples), images at the left."""
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one image")
    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    top = LABEL_HEIGHT if title else 0
    font = ImageFont.load_default()
    texts = [t[:MAX_LABEL_CHARS] for t in (title, *labels) if t]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(columns * w, *(LABEL_PAD + math.ceil(measure.textlength(t, font=font)) + LABEL_PAD for t in texts))
    canvas = Image.new("RGB", (width, top + len(rows) * (h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((LABEL_PAD, 4), title[:MAX_LABEL_CHARS], fill="black", font=font)
    for r, (label, images) in enumerate(zip(labels, rows)):
        y = top + r * (h + LABEL_HEIGHT)
        draw.text((LABEL_PAD, y + 4), label[:MAX_LABEL_CHARS], fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((w, h)), (c * w, y + LABEL_HEIGHT))
    return canvas


def first_images(sample_grid: Image.Image, prompts: int, size: int) -> list[Image.Image]:
    """The first image of every row of a grid made by :func:`grid` with a title."""
    cells = []
    for r in range(prompts):
        y = LABEL_HEIGHT + r * (size + LABEL_HEIGHT) + LABEL_HEIGHT
        cells.append(sample_grid.crop((0, y, size, y + size)))
    return cells


def progression(grids: Sequence[tuple[int, Image.Image]], prompts: Sequence[str], size: int) -> Image.Image:
    """Rows = sampled steps (oldest first), columns = prompts: under- and overfitting at a glance."""
    rows = [first_images(g, len(prompts), size) for _, g in grids]
    labels = [f"step {step}" for step, _ in grids]
    return grid(rows, labels, title="columns: " + " | ".join(prompts))
