"""A tiny Stable-Diffusion-3-shaped model with random weights, written to disk.

``build_tiny_sd3(path)`` writes the folder ``StableDiffusion3Pipeline.save_pretrained``
writes: ``transformer/`` (an ``SD3Transformer2DModel``), ``text_encoder/`` and
``text_encoder_2/`` (``CLIPTextModelWithProjection``: CLIP-L and CLIP-G), ``text_encoder_3/``
(a ``T5EncoderModel``), ``tokenizer/`` and ``tokenizer_2/`` (CLIP byte-level BPE, as
:mod:`dreambooth.trainer.tiny_parts` makes them), ``tokenizer_3/`` (a T5 Unigram tokenizer made
here from a word list and saved as ``tokenizer.json``: no sentencepiece model, nothing from
a hub), ``vae/`` (16 latent channels, SD3's shift and scaling factors, no quant convs) and
``scheduler/`` (``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0).

The widths agree as in the real model, only smaller: the transformer's
``joint_attention_dim`` is T5's ``d_model`` (96), into which the two CLIP encoders' hidden
states side by side (32 + 32) are zero-padded, and its ``pooled_projection_dim`` is the
two projections together (32 + 32). The same seed gives the same bytes.
"""

from __future__ import annotations

import os
import pathlib

from dreambooth.trainer.tiny_parts import (
    WORDS,
    built_in_place,
    save_quietly,
    text_config,
    tokenizer_files,
    write_json,
    write_tokenizer,
)

T5_WIDTH = 96
T5_MAX_LENGTH = 512
#: SD3's VAE (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json)
SHIFT_FACTOR, SCALING_FACTOR = 0.0609, 1.5305


def t5_vocabulary() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2): the prompt
    words whole, then every lowercase letter and digit, so any ASCII word still tokenizes."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = [(f"▁{w}", -1.0) for w in WORDS]
    chars = [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return specials + words + [(f"▁{c}", -4.0) for c, _ in chars] + chars


def write_t5_tokenizer(folder: pathlib.Path) -> None:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(folder)


def build_tiny_sd3(path: str | os.PathLike, *, seed: int = 0, resolution: int = 64) -> pathlib.Path:
    """Write a tiny random SD3-shaped diffusers model to ``path`` and return the path
    (``path`` must not exist or be empty; the caller's torch RNG state is left alone)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vocab, merges = tokenizer_files()
    with built_in_place(path, resolution=resolution) as work:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            SD3Transformer2DModel(
                sample_size=resolution // 8,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=T5_WIDTH,
                caption_projection_dim=32,
                pooled_projection_dim=64,
                pos_embed_max_size=32,
                qk_norm="rms_norm",
            ).save_pretrained(work / "transformer")
            torch.manual_seed(seed + 1)
            AutoencoderKL(
                sample_size=resolution,
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=1,
                norm_num_groups=8,
                scaling_factor=SCALING_FACTOR,
                shift_factor=SHIFT_FACTOR,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ).save_pretrained(work / "vae")
            encoders = []
            for i in range(2):
                torch.manual_seed(seed + 2 + i)
                encoders.append(CLIPTextModelWithProjection(text_config(vocab)))
            torch.manual_seed(seed + 4)
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_vocabulary()),
                    d_model=T5_WIDTH,
                    d_kv=8,
                    d_ff=64,
                    num_layers=2,
                    num_heads=4,
                    relative_attention_num_buckets=8,
                    feed_forward_proj="gated-gelu",
                    pad_token_id=0,
                    eos_token_id=1,
                    decoder_start_token_id=0,
                )
            )
        for name, model in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), (*encoders, t5), strict=True):
            save_quietly(model, work / name)
        write_tokenizer(work / "tokenizer", vocab, merges)
        write_tokenizer(work / "tokenizer_2", vocab, merges)
        write_t5_tokenizer(work / "tokenizer_3")
        (work / "scheduler").mkdir()
        write_json(
            work / "scheduler" / "scheduler_config.json",
            {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": diffusers.__version__,
                "num_train_timesteps": 1000,
                "shift": 3.0,
            },
        )
        write_json(
            work / "model_index.json",
            {
                "_class_name": "StableDiffusion3Pipeline",
                "_diffusers_version": diffusers.__version__,
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_3": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "image_encoder": [None, None],
                "feature_extractor": [None, None],
            },
        )
    return pathlib.Path(path)
