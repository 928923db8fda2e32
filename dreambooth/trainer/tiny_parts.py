"""The parts every tiny model of :mod:`dreambooth.trainer.tiny` (and :mod:`.tiny_clip`,
:mod:`.tiny_sd3`) is made of: CLIP's byte-level BPE tokenizer files, a tiny CLIP text
config, the tiny VAE, quiet saving, and :func:`built_in_place`, which builds a model in a
temporary folder beside its target and moves it into place only when it is whole.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
#: Words that get their own token, so typical DreamBooth prompts are short sequences.
#: Any other text still tokenizes: every byte is in the vocabulary.
WORDS = ("a", "photo", "of", "the", "cat", "dog", "toy", "person", "zwx", "sks")


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


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
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


def write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(folder: pathlib.Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir()
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    write_json(folder / "special_tokens_map.json", special)
    write_json(
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


def text_config(vocab: dict[str, int], hidden_size: int = 32):
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


def tiny_vae(resolution: int, scaling_factor: float):
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


def save_quietly(model, folder: pathlib.Path) -> None:
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


@contextmanager
def built_in_place(path: str | os.PathLike, *, resolution: int = 16) -> Iterator[pathlib.Path]:
    """A folder to build a model in, moved to ``path`` when the block ends without an error.

    ``path`` must not exist or be an empty folder, and ``resolution`` (the model's native
    image size) a positive multiple of 16; the folder is made beside ``path``, so a
    half-written model is never left there: on any error it is removed and ``path`` stays
    as it was."""
    target = _check_target(path, resolution)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
