"""A tiny random CLIP, written to disk: ``build_tiny_clip(path)`` writes a ``CLIPModel``
folder laid out like a saved ``openai/clip-vit-large-patch14`` (``config.json``,
``model.safetensors``, the tokenizer's files and ``preprocessor_config.json`` side by side),
which ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained`` load: the
evaluator of the test suite. Its vision tower is also the tiny SD 1.x models' safety
checker (:func:`write_safety_checker`).
"""

from __future__ import annotations

import os
import pathlib

from dreambooth.trainer.tiny_parts import (
    built_in_place,
    save_quietly,
    text_config,
    tokenizer_files,
    write_json,
    write_tokenizer,
)

#: CLIP's image preprocessing (openai/clip-vit-large-patch14's values), at the tiny size
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


#: a tiny CLIP initialised at the default scale maps every image to nearly the same
#: embedding (cosine ~0.98 between unrelated noise images); 5x larger initial weights keep
#: different images apart (~0.2) and identical ones at 1, as a trained CLIP does
CLIP_INIT_FACTOR = 5.0


def clip_config(vocab: dict[str, int], image_size: int):
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        hidden_act="quick_gelu",
        initializer_factor=CLIP_INIT_FACTOR,
    )
    text = {**text_config(vocab).to_dict(), "initializer_factor": CLIP_INIT_FACTOR}
    return CLIPConfig(
        text_config=text, vision_config=vision.to_dict(), projection_dim=32, initializer_factor=CLIP_INIT_FACTOR
    )


def write_image_processor(folder: pathlib.Path, image_size: int) -> None:
    write_json(
        folder / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": image_size},
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
            "resample": 3,
        },
    )


def write_safety_checker(work: pathlib.Path, vocab: dict[str, int], seed: int) -> None:
    """``safety_checker/`` (a StableDiffusionSafetyChecker: CLIP's vision tower and projection)
    and ``feature_extractor/`` (its CLIPImageProcessor), as SD 1.x snapshots ship them."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed)
    save_quietly(StableDiffusionSafetyChecker(clip_config(vocab, 32)), work / "safety_checker")
    (work / "feature_extractor").mkdir()
    write_image_processor(work / "feature_extractor", 32)


def build_tiny_clip(path: str | os.PathLike, *, seed: int = 0, image_size: int = 32) -> pathlib.Path:
    """Write a tiny random ``CLIPModel`` (text and vision towers, both projections) in the
    folder layout of a saved ``openai/clip-vit-large-patch14`` to ``path``; returns the path.
    ``CLIPModel.from_pretrained(path)`` and ``CLIPProcessor.from_pretrained(path)`` load it."""
    import torch
    from transformers import CLIPModel

    vocab, merges = tokenizer_files()
    with built_in_place(path) as work:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(clip_config(vocab, image_size))
        save_quietly(model, work)
        tokenizer = work / "tokenizer"
        write_tokenizer(tokenizer, vocab, merges)
        for file in tokenizer.iterdir():  # a CLIP folder keeps its tokenizer beside the weights
            file.rename(work / file.name)
        tokenizer.rmdir()
        write_image_processor(work, image_size)
    return pathlib.Path(path)
