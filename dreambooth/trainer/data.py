"""Instance (and class) images: found, checked, resized and center-cropped.

No torchvision: PIL and numpy do the few transforms DreamBooth needs. Every problem with
the input ends in a :class:`DataError` that names the object and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth.trainer.errors import DataError
from dreambooth.trainer.families.base import SampleSize

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class Example:
    """One training image: pixels in [-1, 1], shape (3, H, W), its prompt, and where the
    pixels came from (SDXL conditions on the photo's size and the crop)."""

    pixels: torch.Tensor
    prompt: str
    name: str
    size: SampleSize


def find_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` in a stable order (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_pixels(path: Path, resolution: int, *, where: str) -> tuple[torch.Tensor, SampleSize]:
    """Resize the shorter side to ``resolution``, center-crop, scale to [-1, 1]; and the
    photo's size and the crop's top-left corner (in resized pixels)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            original = (img.height, img.width)
            img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            f"{where} is not a readable image ({err.__class__.__name__}): replace or delete it"
        ) from None
    scale = resolution / min(original)
    top = max(0, round((original[0] * scale - resolution) / 2))
    left = max(0, round((original[1] * scale - resolution) / 2))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    size = SampleSize(original=original, crop_top_left=(top, left), target=(resolution, resolution))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), size


def load_examples(
    folder: Path,
    *,
    prompt: str,
    resolution: int,
    use_captions: bool,
    source_uri: str,
) -> list[Example]:
    """Every image below ``folder`` (downloaded from ``source_uri``) as an :class:`Example`.

    A same-named ``.txt`` next to an image is its prompt when ``use_captions`` is on.
    """
    paths = find_images(folder)
    if not paths:
        raise DataError(
            f"no images (png, jpg, jpeg, webp) found under {source_uri}: upload 3-10 photos "
            "of the subject there, or fix the URI"
        )
    examples = []
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        where = source_uri.rstrip("/") + "/" + rel
        caption = path.with_suffix(CAPTION_SUFFIX)
        text = prompt
        if use_captions and caption.is_file():
            text = caption.read_text(encoding="utf-8", errors="replace").strip() or prompt
        pixels, size = load_pixels(path, resolution, where=where)
        examples.append(Example(pixels, text, rel, size))
    return examples


def sample_positions(step: int, micro: int, rank: int, *, per_device: int, processes: int,
                     accumulation: int) -> range:
    """Global positions (in the run's stream of samples) that ``rank`` trains on in
    micro-batch ``micro`` of ``step``; ranks never overlap."""
    per_step = per_device * processes * accumulation
    start = step * per_step + (micro * processes + rank) * per_device
    return range(start, start + per_device)


def dataset_indices(positions: range, dataset_size: int, seed: int) -> list[int]:
    """The example at each position. The data order is a pure function of (seed, position):
    epoch ``e`` visits the dataset in a permutation drawn from ``seed + e``, so a resumed run
    continues with exactly the images an uninterrupted one would have used."""
    out = []
    for position in positions:
        epoch, offset = divmod(position, dataset_size)
        out.append(_permutation(seed + epoch, dataset_size)[offset])
    return out


@lru_cache(maxsize=8)
def _permutation(seed: int, size: int) -> tuple[int, ...]:
    return tuple(torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist())
