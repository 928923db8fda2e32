"""A tiny Stable-Diffusion-1.5-shaped model with random weights, written to disk.

``build_tiny_model(path)`` writes a folder laid out exactly like a diffusers snapshot of
SD 1.5 (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; no safety checker, no feature extractor), with safetensors weights. It
loads with ``StableDiffusionPipeline.from_pretrained(path)`` and each part with the usual
``from_pretrained(path, subfolder=...)``, so the trainer treats it like a real base model.

It is the model the test suite really trains on the CPU and the default base model of
``dreambooth demo`` where no weights can be downloaded. The shapes follow SD 1.5 (4 latent
channels, a VAE that downsamples by 8 with scaling factor 0.18215, a CLIP text encoder
with 77 positions, cross attention in the UNet, the SD 1.5 PNDM scheduler config) but every
width is tiny: under 4 MB on disk, built in a fraction of a second. The same seed gives
byte-identical files.

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


def build_tiny_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    prediction_type: PredictionType = "epsilon",
    resolution: int = 64,
) -> pathlib.Path:
    """Write a tiny random SD-1.5-shaped diffusers model to ``path`` and return the path.

    ``path`` must not exist or be an empty folder: the model is built in a temporary
    folder beside it and moved into place, so a half-written model is never left there.
    ``prediction_type`` goes into the scheduler config (``"v_prediction"`` as in SD 2.x).
    ``resolution`` is the native image size (a multiple of 16); the UNet's
    ``sample_size`` is ``resolution // 8``. The caller's torch RNG state is left alone.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}"
        )
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, not {resolution}")
    target = pathlib.Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)

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
                block_out_channels=(32, 64),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=8,  # heads, as in SD 1.5's config
            ).save_pretrained(work / "unet")
            torch.manual_seed(seed + 1)
            AutoencoderKL(
                sample_size=resolution,
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: factor 8
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=1,
                norm_num_groups=8,
                scaling_factor=0.18215,
            ).save_pretrained(work / "vae")
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(vocab),
                    hidden_size=32,
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
            )
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # transformers 5 shows one per save
        try:
            text_encoder.save_pretrained(work / "text_encoder")
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
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
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
        )
        for folder, _, files in os.walk(work):  # mkdtemp and safetensors 0.8 make 0700/0600
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        if target.exists():
            target.rmdir()  # empty, checked above
        work.rename(target)
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
