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

``build_tiny_clip(path)`` writes a tiny random ``CLIPModel`` folder laid out like a saved
``openai/clip-vit-large-patch14`` (``config.json``, ``model.safetensors``, the tokenizer's
files and ``preprocessor_config.json`` side by side), which ``CLIPModel.from_pretrained``
and ``CLIPProcessor.from_pretrained`` load: the evaluator of the test suite.

For humans: ``python -m dreambooth.trainer.tiny OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
from typing import Literal

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
#: Words that get their own token, so typical DreamBooth prompts are short sequences.
#: Any other text still tokenizes: every byte is in the vocabulary.
WORDS = ("a", "photo", "of", "the", "cat", "dog", "toy", "person", "zwx", "sks")

PredictionType = Literal["epsilon", "v_prediction"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary and merge list in CLIP's layout.

    Like CLIP's: the 256 byte characters, the same with the end-of-word mark ``</w>``,
    the merged tokens, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:  # merge each word left to right into one "word</w>" token
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge, merged = f"{symbols[0]} {symbols[1]}", symbols[0] + symbols[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(folder: pathlib.Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir()
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_LENGTH,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
        },
    )


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


def _text_config(vocab: dict[str, int], hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def _tiny_vae(resolution: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: factor 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
    )


def _save_quietly(model, folder: pathlib.Path) -> None:
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # transformers 5 shows one per save
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _check_target(path: str | os.PathLike, resolution: int) -> pathlib.Path:
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, not {resolution}")
    target = pathlib.Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _move_into_place(work: pathlib.Path, target: pathlib.Path) -> None:
    for folder, _, files in os.walk(work):  # mkdtemp and safetensors 0.8 make 0700/0600
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    if target.exists():
        target.rmdir()  # empty, checked before
    work.rename(target)


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
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}"
        )
    target = _check_target(path, resolution)

    vocab, merges = _tokenizer_files()
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
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
            _tiny_vae(resolution, 0.18215).save_pretrained(work / "vae")
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(_text_config(vocab))
            if safety_checker:
                _write_safety_checker(work, vocab, seed + 3)
        _save_quietly(text_encoder, work / "text_encoder")
        _write_tokenizer(work / "tokenizer", vocab, merges)
        (work / "scheduler").mkdir()
        _write_json(
            work / "scheduler" / "scheduler_config.json",
            {**_scheduler_config(prediction_type), "_diffusers_version": diffusers.__version__},
        )
        _write_json(
            work / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if safety_checker
                else [None, None],
                "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety_checker else [None, None],
                "requires_safety_checker": safety_checker,
            },
        )
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


#: CLIP's image preprocessing (openai/clip-vit-large-patch14's values), at the tiny size
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


#: a tiny CLIP initialised at the default scale maps every image to nearly the same
#: embedding (cosine ~0.98 between unrelated noise images); 5x larger initial weights keep
#: different images apart (~0.2) and identical ones at 1, as a trained CLIP does
CLIP_INIT_FACTOR = 5.0


def _clip_config(vocab: dict[str, int], image_size: int):
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=8,
                              hidden_act="quick_gelu", initializer_factor=CLIP_INIT_FACTOR)
    text = {**_text_config(vocab).to_dict(), "initializer_factor": CLIP_INIT_FACTOR}
    return CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=32,
                      initializer_factor=CLIP_INIT_FACTOR)


def _write_image_processor(folder: pathlib.Path, image_size: int) -> None:
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 3,
    })


def _write_safety_checker(work: pathlib.Path, vocab: dict[str, int], seed: int) -> None:
    """``safety_checker/`` (a StableDiffusionSafetyChecker: CLIP's vision tower and projection)
    and ``feature_extractor/`` (its CLIPImageProcessor), as SD 1.x snapshots ship them."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed)
    _save_quietly(StableDiffusionSafetyChecker(_clip_config(vocab, 32)), work / "safety_checker")
    (work / "feature_extractor").mkdir()
    _write_image_processor(work / "feature_extractor", 32)


def build_tiny_clip(path: str | os.PathLike, *, seed: int = 0, image_size: int = 32) -> pathlib.Path:
    """Write a tiny random ``CLIPModel`` (text and vision towers, both projections) in the
    folder layout of a saved ``openai/clip-vit-large-patch14`` to ``path``; returns the path.
    ``CLIPModel.from_pretrained(path)`` and ``CLIPProcessor.from_pretrained(path)`` load it."""
    import torch
    from transformers import CLIPModel

    target = _check_target(path, 16)
    vocab, merges = _tokenizer_files()
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(_clip_config(vocab, image_size))
        _save_quietly(model, work)
        tokenizer = work / "tokenizer"
        _write_tokenizer(tokenizer, vocab, merges)
        for file in tokenizer.iterdir():  # a CLIP folder keeps its tokenizer beside the weights
            file.rename(work / file.name)
        tokenizer.rmdir()
        _write_image_processor(work, image_size)
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def build_tiny_vae(path: str | os.PathLike, *, seed: int = 0, resolution: int = 64,
                   scaling_factor: float = 0.13025) -> pathlib.Path:
    """Write a lone tiny random ``AutoencoderKL`` folder (what ``baseModel.vae`` names, as
    ``AutoencoderKL.save_pretrained`` writes it) to ``path`` and return the path. The tiny
    models' VAE shape; SDXL's scaling factor unless told."""
    import torch

    target = _check_target(path, resolution)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _tiny_vae(resolution, scaling_factor).save_pretrained(work)
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def build_tiny_sdxl(path: str | os.PathLike, *, seed: int = 0, resolution: int = 64,
                    text_encoder_2_width: int = 32) -> pathlib.Path:
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

    target = _check_target(path, resolution)
    vocab, merges = _tokenizer_files()
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
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
            _tiny_vae(resolution, 0.13025).save_pretrained(work / "vae")
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(_text_config(vocab))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, text_encoder_2_width))
        _save_quietly(text_encoder, work / "text_encoder")
        _save_quietly(text_encoder_2, work / "text_encoder_2")
        _write_tokenizer(work / "tokenizer", vocab, merges)
        _write_tokenizer(work / "tokenizer_2", vocab, merges)
        (work / "scheduler").mkdir()
        _write_json(work / "scheduler" / "scheduler_config.json", {
            "_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__,
            "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
            "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
            "skip_prk_steps": True, "prediction_type": "epsilon", "trained_betas": None,
        })
        _write_json(work / "model_index.json", {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
            "force_zeros_for_empty_prompt": True,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "image_encoder": [None, None], "feature_extractor": [None, None],
        })
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


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
