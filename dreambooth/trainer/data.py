"""Instance (and class) images: found, checked, resized and center-cropped (to a square, or
to aspect-ratio buckets: dreambooth/trainer/buckets.py).

No torchvision: PIL and numpy do the few transforms DreamBooth needs. Every problem with
the input ends in a :class:`DataError` that names the object and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth.trainer.buckets import Framing, cover, mirrored_left
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
    flipped: bool = False  # mirrored left-right (training.randomFlip)


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


def read_image(path: Path, *, where: str) -> Image.Image:
    """The photo upright (EXIF orientation applied), in RGB."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where} is not a readable image ({err.__class__.__name__}): replace or delete it") from None


def frame(
    img: Image.Image, target: tuple[int, int], *, flip: bool = False, where: str, max_upscale: float | None = None
) -> tuple[torch.Tensor, SampleSize]:
    """Resize ``img`` to cover ``target`` (height, width), center-crop, maybe mirror, scale to
    [-1, 1]; and the photo's size and the crop's top-left corner in resized pixels (mirrored
    with the pixels, as SDXL's time ids expect)."""
    original = (img.height, img.width)
    scale, resized, (top, left) = cover(original, target)
    if max_upscale is not None and scale > max_upscale + 1e-9:
        raise DataError(
            f"{where} is {img.width}x{img.height} pixels: covering its {target[1]}x{target[0]} bucket "
            f"would enlarge it {scale:.2f}x, more than training.buckets.maxUpscale ({max_upscale:g}): "
            "use a larger photo, raise maxUpscale, or lower training.resolution"
        )
    img = ImageOps.fit(img, (target[1], target[0]), Image.Resampling.BICUBIC)
    if flip:
        img = ImageOps.mirror(img)
        left = mirrored_left(resized[1], left, target[1])
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    size = SampleSize(original=original, crop_top_left=(top, left), target=target)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), size


def load_examples(
    folder: Path,
    *,
    prompt: str,
    resolution: int,
    use_captions: bool,
    source_uri: str,
    framing: Framing | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Every image below ``folder`` (downloaded from ``source_uri``; the first ``limit``) as
    :class:`Example` s: one per variant of ``framing`` (default: a ``resolution`` square),
    image by image.

    A same-named ``.txt`` next to an image is its prompt when ``use_captions`` is on.
    """
    framing = framing or Framing.square(resolution)
    paths = find_images(folder)[:limit]
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
        img = read_image(path, where=where)
        for target, flip in framing.variants((img.height, img.width)):
            pixels, size = frame(img, target, flip=flip, where=where, max_upscale=framing.max_upscale)
            examples.append(Example(pixels, text, rel, size, flip))
    return examples


def sample_positions(step: int, micro: int, rank: int, *, per_device: int, processes: int, accumulation: int) -> range:
    """Global positions (in the run's stream of samples) that ``rank`` trains on in
    micro-batch ``micro`` of ``step``; ranks never overlap."""
    per_step = per_device * processes * accumulation
    start = step * per_step + (micro * processes + rank) * per_device
    return range(start, start + per_device)
