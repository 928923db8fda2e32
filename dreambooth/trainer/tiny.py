"""A tiny Stable-Diffusion-1.5-shaped model with random weights, written to disk.

``build_tiny_model(path)`` writes a folder laid out exactly like a diffusers snapshot of
SD 1.5 (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; with ``safety_checker=True`` also ``safety_checker/`` and
``feature_extractor/`` as SD 1.x snapshots ship them), with safetensors weights. It
loads with ``StableDiffusionPipeline.from_pretrained(path)`` and each part with the usual
``from_pretrained(path, subfolder=...)``, so the trainer treats it like a real base model.

It is the model the test suite really trains on the CPU and the default base model of
``dreambooth demo`` where no weights can be downloaded. The shapes follow SD 1.5 (4 latent
channels, a VAE that downsamples by 8 with scaling factor 0.18215, a CLIP text encoder
with 77 positions, cross attention in the UNet, the SD 1.5 PNDM scheduler config) but every
width is tiny: under 4 MB on disk, built in a fraction of a second. The same seed gives
byte-identical files.

``build_tiny_sdxl(path)`` writes the SDXL-shaped equivalent and ``build_tiny_vae(path)`` a
lone VAE (what ``baseModel.vae`` names). Their parts (tokenizer, text config, VAE) are in
:mod:`dreambooth.trainer.tiny_parts`; the tiny CLIP evaluator is in
:mod:`dreambooth.trainer.tiny_clip`, the tiny SD3 in :mod:`dreambooth.trainer.tiny_sd3`.

For humans: ``python -m dreambooth.trainer.tiny OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Literal

from dreambooth.trainer.tiny_clip import write_safety_checker
from dreambooth.trainer.tiny_parts import (
    built_in_place,
    save_quietly,
    text_config,
    tiny_vae,
    tokenizer_files,
    write_json,
    write_tokenizer,
)

PredictionType = Literal["epsilon", "v_prediction"]


def _scheduler_config(prediction_type: str) -> dict:
    """SD 1.5's scheduler config; SD 2.x differs only in ``prediction_type``."""
    return {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
        "prediction_type": prediction_type,
    }


def build_tiny_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    prediction_type: PredictionType = "epsilon",
    resolution: int = 64,
    unet_width: int = 32,
    safety_checker: bool = False,
) -> pathlib.Path:
    """Write a tiny random SD-1.5-shaped diffusers model to ``path`` and return the path.

    ``path`` must not exist or be an empty folder: the model is built in a temporary
    folder beside it and moved into place, so a half-written model is never left there.
    ``prediction_type`` goes into the scheduler config (``"v_prediction"`` as in SD 2.x).
    ``resolution`` is the native image size (a multiple of 16); the UNet's
    ``sample_size`` is ``resolution // 8``. ``unet_width`` is the first block's channels
    (the second has twice as many): wider for a bigger checkpoint (benches).
    ``safety_checker``: also write ``safety_checker/`` and ``feature_extractor/`` (whose CLIP
    vision tower the evaluator can fall back on). The caller's torch RNG state is left alone.
    """
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    vocab, merges = tokenizer_files()
    with built_in_place(path, resolution=resolution) as work:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            UNet2DConditionModel(
                sample_size=resolution // 8,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(unet_width, 2 * unet_width),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=8,  # heads, as in SD 1.5's config
            ).save_pretrained(work / "unet")
            torch.manual_seed(seed + 1)
            tiny_vae(resolution, 0.18215).save_pretrained(work / "vae")
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(text_config(vocab))
            if safety_checker:
                write_safety_checker(work, vocab, seed + 3)
        save_quietly(text_encoder, work / "text_encoder")
        write_tokenizer(work / "tokenizer", vocab, merges)
        (work / "scheduler").mkdir()
        write_json(
            work / "scheduler" / "scheduler_config.json",
            {**_scheduler_config(prediction_type), "_diffusers_version": diffusers.__version__},
        )
        write_json(
            work / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]
                if safety_checker
                else [None, None],
                "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety_checker else [None, None],
                "requires_safety_checker": safety_checker,
            },
        )
    return pathlib.Path(path)


def build_tiny_vae(
    path: str | os.PathLike, *, seed: int = 0, resolution: int = 64, scaling_factor: float = 0.13025
) -> pathlib.Path:
    """Write a lone tiny random ``AutoencoderKL`` folder (what ``baseModel.vae`` names, as
    ``AutoencoderKL.save_pretrained`` writes it) to ``path`` and return the path. The tiny
    models' VAE shape; SDXL's scaling factor unless told."""
    import torch

    with built_in_place(path, resolution=resolution) as work, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny_vae(resolution, scaling_factor).save_pretrained(work)
    return pathlib.Path(path)


def build_tiny_sdxl(
    path: str | os.PathLike, *, seed: int = 0, resolution: int = 64, text_encoder_2_width: int = 32
) -> pathlib.Path:
    """Write a tiny random SDXL-shaped diffusers model to ``path`` and return the path.

    The folder of a ``StableDiffusionXLPipeline`` (``text_encoder/`` a ``CLIPTextModel``,
    ``text_encoder_2/`` a ``CLIPTextModelWithProjection``, ``tokenizer/`` and ``tokenizer_2/``,
    ``unet/`` conditioned on both encoders' hidden states (32 + 32 = cross attention 64) and on
    ``text_time`` added conditioning (6 time ids x 8 + the 32-wide pooled embedding = 80), the
    VAE with SDXL's scaling factor, SDXL's Euler scheduler config); tiny widths, random weights,
    the same bytes for the same seed. ``StableDiffusionXLPipeline.from_pretrained`` loads it.

    ``text_encoder_2_width`` widens the second encoder (the cross attention grows with it).
    ``from_single_file`` tells SDXL's two encoders apart by their width (768 and 1280 in SDXL),
    so a single file of this model reads back only with a width other than 32.
    """
    import diffusers
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = tokenizer_files()
    with built_in_place(path, resolution=resolution) as work:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            UNet2DConditionModel(
                sample_size=resolution // 8,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                cross_attention_dim=32 + text_encoder_2_width,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80,
            ).save_pretrained(work / "unet")
            torch.manual_seed(seed + 1)
            tiny_vae(resolution, 0.13025).save_pretrained(work / "vae")
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(text_config(vocab))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab, text_encoder_2_width))
        save_quietly(text_encoder, work / "text_encoder")
        save_quietly(text_encoder_2, work / "text_encoder_2")
        write_tokenizer(work / "tokenizer", vocab, merges)
        write_tokenizer(work / "tokenizer_2", vocab, merges)
        (work / "scheduler").mkdir()
        write_json(
            work / "scheduler" / "scheduler_config.json",
            {
                "_class_name": "EulerDiscreteScheduler",
                "_diffusers_version": diffusers.__version__,
                "num_train_timesteps": 1000,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "steps_offset": 1,
                "timestep_spacing": "leading",
                "interpolation_type": "linear",
                "use_karras_sigmas": False,
                "clip_sample": False,
                "sample_max_value": 1.0,
                "set_alpha_to_one": False,
                "skip_prk_steps": True,
                "prediction_type": "epsilon",
                "trained_betas": None,
            },
        )
        write_json(
            work / "model_index.json",
            {
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": diffusers.__version__,
                "force_zeros_for_empty_prompt": True,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "image_encoder": [None, None],
                "feature_extractor": [None, None],
            },
        )
    return pathlib.Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth.trainer.tiny",
        description="Build a tiny random SD-1.5-shaped diffusers model (for tests and demos).",
    )
    parser.add_argument("output_dir", help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(
            args.output_dir,
            seed=args.seed,
            prediction_type=args.prediction_type,
            resolution=args.resolution,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(path)


if __name__ == "__main__":
    main()
