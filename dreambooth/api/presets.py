"""Presets: the recommended settings of each model family, as partial specs that explicit
fields override.

The values and the sources for them are in docs/presets.md. ``BASE`` holds the fallbacks
for fields that neither the user nor the preset sets (it is also what ``custom`` means);
a family's values (``FAMILY_BASE``, ``FAMILY_PRESETS``) win over the SD 1.x numbers, which
the seed's blog measured.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Preset(StrEnum):
    OBJECT = "object"
    FACE = "face"
    STYLE = "style"
    CUSTOM = "custom"


class ModelFamily(StrEnum):
    """Which Stable Diffusion generation the base model is (dreambooth/trainer/families)."""

    AUTO = "auto"
    SD = "sd"
    SDXL = "sdxl"
    SD3 = "sd3"


#: Fallbacks for preset-controlled fields (section -> field (wire name) -> value).
BASE: dict[str, dict[str, Any]] = {
    "training": {
        "steps": 400,
        "learningRate": 2e-6,
        "batchSize": 1,
        "trainTextEncoder": False,
        "method": "full",
        "resolution": 512,
        "buckets": {"enabled": False},
    },
    "prior": {"enabled": False, "numImages": 100},
    # the seed: DDIM beat PNDM and LMS clearly on overfit models, up to 100 steps worked well
    "validation": {"scheduler": "ddim", "inferenceSteps": 100},
}

PRESETS: dict[Preset, dict[str, dict[str, Any]]] = {
    # Blog: objects trained well with 400 steps at LR 2e-6 and batch size 4; prior
    # preservation made little difference for objects.
    Preset.OBJECT: {
        "training": {"steps": 400, "learningRate": 2e-6, "batchSize": 4, "trainTextEncoder": False},
        "prior": {"enabled": False},
    },
    # Blog: faces need more steps (800-1,200) at a low LR (1e-6 to 2e-6) with batch size 2;
    # prior preservation is essential, and training the text encoder gave by far the best
    # faces.
    Preset.FACE: {
        "training": {"steps": 1200, "learningRate": 1e-6, "batchSize": 2, "trainTextEncoder": True},
        "prior": {"enabled": True, "classPrompt": "a photo of a person", "numImages": 200},
    },
    # Not measured in the blog: a style is learned from varied images, so we take the
    # blog's low-LR advice with more steps, and keep the class (e.g. "a painting") intact
    # with prior preservation off by default to avoid washing out the style.
    Preset.STYLE: {
        "training": {"steps": 1500, "learningRate": 1e-6, "batchSize": 2, "trainTextEncoder": False},
        "prior": {"enabled": False},
    },
    Preset.CUSTOM: {},
}

#: diffusers' SDXL DreamBooth example (examples/dreambooth/README_sdxl.md): LoRA (rank 4, the
#: script's default) on the UNet at 1024 px, LR 1e-4 constant, 500 steps, 4 images per step
#: (batch 1 x 4 accumulation on a 40 GB A100), no text-encoder training, no prior
#: preservation: "decent results" on its dog, logo, toy and face datasets alike. Samples: 25
#: steps of the Euler scheduler SDXL ships with (its inference example). Aspect-ratio buckets
#: on: SDXL was trained on them and conditions on each image's size and crop (its paper).
FAMILY_BASE: dict[ModelFamily, dict[str, dict[str, Any]]] = {
    ModelFamily.SDXL: {
        "training": {
            "method": "lora",
            "resolution": 1024,
            "steps": 500,
            "learningRate": 1e-4,
            "batchSize": 4,
            "trainTextEncoder": False,
            "buckets": {"enabled": True},
        },
        "validation": {"scheduler": "euler", "inferenceSteps": 25},
    },
}
#: diffusers' SD3 DreamBooth LoRA example (examples/dreambooth/README_sd3.md,
#: train_dreambooth_lora_sd3.py): LoRA rank 4 (the script's default) on the transformer's
#: attention, LR 4e-4 constant, 500 steps, 4 images per step (batch 1 x 4 accumulation), no
#: text-encoder training, T5 prompts of 77 tokens (the script's default); 1024 px, the
#: resolution of the README's other SD3 runs and of SD3 itself (the LoRA command trains at
#: 512). Samples: StableDiffusion3Pipeline's flow-matching Euler scheduler at its default 28
#: steps.
FAMILY_BASE[ModelFamily.SD3] = {
    "training": {
        "method": "lora",
        "resolution": 1024,
        "steps": 500,
        "learningRate": 4e-4,
        "batchSize": 4,
        "trainTextEncoder": False,
        "maxSequenceLength": 77,
    },
    "validation": {"scheduler": "flow_euler", "inferenceSteps": 28},
}
#: The same recipe for every SDXL preset: the example reports it for a face too, and faces
#: keep prior preservation's class images; a style takes more steps (as SD 1.x's does).
FAMILY_PRESETS: dict[ModelFamily, dict[Preset, dict[str, dict[str, Any]]]] = {
    ModelFamily.SDXL: {
        Preset.OBJECT: {"prior": {"enabled": False}},
        Preset.FACE: {"prior": {"enabled": True, "classPrompt": "a photo of a person", "numImages": 200}},
        Preset.STYLE: {"training": {"steps": 1000}, "prior": {"enabled": False}},
        Preset.CUSTOM: {},
    },
}
#: SD3 as SDXL: one recipe; faces keep prior preservation, a style takes more steps (the
#: README's style run, yarn art, trains 1,500).
FAMILY_PRESETS[ModelFamily.SD3] = {
    Preset.OBJECT: {"prior": {"enabled": False}},
    Preset.FACE: {"prior": {"enabled": True, "classPrompt": "a photo of a person", "numImages": 200}},
    Preset.STYLE: {"training": {"steps": 1500}, "prior": {"enabled": False}},
    Preset.CUSTOM: {},
}


def preset_value(preset: Preset, section: str, field: str, family: ModelFamily = ModelFamily.SD) -> Any:
    """The value ``preset`` gives ``section.field`` for ``family``: the family's preset, the
    family's base, the SD 1.x preset, then :data:`BASE`."""
    for table in (FAMILY_PRESETS.get(family, {}).get(preset, {}), FAMILY_BASE.get(family, {}), PRESETS[preset], BASE):
        value = table.get(section, {}).get(field)
        if value is not None:
            return value
    return None


def describe(section: str, field: str) -> str:
    """One line for a field's description: its default under each preset (SD 1.x/2.x; SDXL
    and SD3 where they differ)."""

    def values(family: ModelFamily) -> list[str]:
        found = [(preset, preset_value(preset, section, field, family)) for preset in Preset]
        return [f"{p} {v!r}".replace("True", "true").replace("False", "false") for p, v in found if v is not None]

    sd = values(ModelFamily.SD)
    if not sd:
        return ""
    text = " Default: from the preset (" + ", ".join(sd) + ")"
    for family, title in ((ModelFamily.SDXL, "SDXL"), (ModelFamily.SD3, "SD3")):
        other = values(family)
        text += f"; {title}: " + ", ".join(other) if other != sd else ""
    return text + "."
