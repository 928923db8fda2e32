"""Aspect-ratio buckets and the draw of what each sample trains on.

A bucket is a (height, width) of about ``resolution²`` pixels with sides on the bucket step.
Each photo goes to the bucket nearest its aspect ratio, is resized to cover it and
center-cropped (:mod:`dreambooth.trainer.data` frames it); with ``training.randomFlip`` it is
also cached mirrored. Class images are framed in every bucket the photos use, so that a
micro-batch's class images share its bucket while keeping their own size and crop.

:class:`Draw` says which cached image each sample of the run trains on. Like every other
random choice of the trainer it is a pure function of (seed, position in the run): a
micro-batch is the same whether one process draws it or several, and a resumed run draws
what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from dreambooth.api.spec import TrainingSpec

Size = tuple[int, int]  # (height, width) in pixels

#: class images draw from their own streams, far from any instance sample's position
CLASS_STREAM = 1 << 40


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """Every bucket: for each width on the step, the tallest height on the step that keeps
    the area within ``resolution²`` (and both sides within bounds), in both orientations."""
    area, found = resolution * resolution, set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            found |= {(height, width), (width, height)}
    return sorted(found)


def nearest_bucket(original: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the photo's (ties: the larger bucket)."""
    ratio = math.log(original[1] / original[0])
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1], b))


@dataclass(frozen=True)
class Framing:
    """Where each image's training pixels come from: the bucket(s) it is cropped to and
    whether a mirrored copy is kept too (``variants`` of one image, in cache order)."""

    buckets: tuple[Size, ...]
    flip: bool = False
    #: the most an image may be enlarged to cover its bucket (None: no limit)
    max_upscale: float | None = None
    #: frame each image in every bucket (class images) instead of its nearest one (photos)
    every_bucket: bool = False

    @classmethod
    def square(cls, resolution: int, *, flip: bool = False) -> Framing:
        return cls(((resolution, resolution),), flip=flip)

    @classmethod
    def for_photos(cls, training: TrainingSpec) -> Framing:
        b, flip = training.buckets, training.random_flip
        if b is None or not b.enabled:
            return cls.square(training.resolution, flip=flip)
        return cls(
            tuple(bucket_sizes(training.resolution, b.min_side, b.max_side, b.step)),
            flip=flip,
            max_upscale=b.max_upscale,
        )

    def for_classes(self, photo_buckets: Sequence[Size]) -> Framing:
        """Class images: in every bucket the photos use, never refused for their size."""
        return Framing(tuple(sorted(set(photo_buckets))), flip=self.flip, every_bucket=True)

    @property
    def flips(self) -> tuple[bool, ...]:
        return (False, True) if self.flip else (False,)

    def variants(self, original: Size) -> list[tuple[Size, bool]]:
        targets = self.buckets if self.every_bucket else (nearest_bucket(original, self.buckets),)
        return [(target, flip) for target in targets for flip in self.flips]


def cover(original: Size, target: Size) -> tuple[float, Size, tuple[int, int]]:
    """Resizing ``original`` to cover ``target``: (scale, resized size, center crop's top-left)."""
    scale = max(target[0] / original[0], target[1] / original[1])
    resized = (max(target[0], round(original[0] * scale)), max(target[1], round(original[1] * scale)))
    top = max(0, round((original[0] * scale - target[0]) / 2))
    left = max(0, round((original[1] * scale - target[1]) / 2))
    return scale, resized, (top, left)


def mirrored_left(resized_width: int, left: int, target_width: int) -> int:
    """The crop's left edge once the resized image is mirrored (its right edge before)."""
    return resized_width - left - target_width


def flipped(seed: int, position: int) -> bool:
    """Whether the sample at ``position`` is mirrored (``training.randomFlip``)."""
    return bool(np.random.SeedSequence([seed, position, 2]).generate_state(1)[0] & 1)


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


@dataclass(frozen=True)
class Draw:
    """Which cached image each sample at a position trains on.

    Positions ``g * micro_size ... (g + 1) * micro_size - 1`` form global micro-batch ``g``
    (all processes' shares of one micro-batch of one step). With one bucket the photos come
    in one stream of per-epoch permutations. With several, an epoch is a shuffled list of
    micro-batches: each bucket's photos permuted and cut into micro-batches (the last one
    filled up from the start of the same permutation), so every photo trains once an epoch
    and a micro-batch never mixes buckets.
    """

    seed: int
    micro_size: int  # samples per micro-batch, over all processes
    photo_buckets: tuple[int, ...]  # the bucket of each photo (an index into the buckets used)
    flips: int = 1  # cached variants per image and bucket: 2 with training.randomFlip
    class_images: int = 0

    @classmethod
    def of(cls, photos: Sequence, *, flips: int, seed: int, micro_size: int, class_images: int = 0) -> Draw:
        """The draw over ``photos`` (the instance examples, ``flips`` variants each)."""
        targets = [e.size.target for e in photos[::flips]]
        used = sorted(set(targets))
        return cls(seed, micro_size, tuple(used.index(t) for t in targets), flips, class_images)

    @property
    def buckets(self) -> int:
        return max(self.photo_buckets) + 1

    def _photos(self, positions: range) -> list[int]:
        if self.buckets == 1:
            return dataset_indices(positions, len(self.photo_buckets), self.seed)
        per_epoch = len(_epoch(self.seed, self.photo_buckets, self.micro_size))
        out = []
        for position in positions:
            micro, offset = divmod(position, self.micro_size)
            epoch, index = divmod(micro, per_epoch)
            out.append(_epoch(self.seed + epoch, self.photo_buckets, self.micro_size)[index][offset])
        return out

    def _variant(self, image: int, position: int) -> int:
        return image * self.flips + (flipped(self.seed, position) if self.flips == 2 else 0)

    def instances(self, positions: range) -> list[int]:
        """The cached instance variant (photo, mirrored?) of each position."""
        return [self._variant(photo, p) for photo, p in zip(self._photos(positions), positions, strict=True)]

    def classes(self, positions: range) -> list[int]:
        """The cached class variant of each position: class image, in the micro-batch's bucket."""
        bucket = self.photo_buckets[self._photos(positions[:1])[0]]
        images = dataset_indices(positions, self.class_images, self.seed)
        return [
            self._variant(image * self.buckets + bucket, CLASS_STREAM + p)
            for image, p in zip(images, positions, strict=True)
        ]


@lru_cache(maxsize=8)
def _epoch(seed: int, photo_buckets: tuple[int, ...], micro_size: int) -> tuple[tuple[int, ...], ...]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for bucket in range(max(photo_buckets) + 1):
        photos = [i for i, b in enumerate(photo_buckets) if b == bucket]
        order = [photos[i] for i in torch.randperm(len(photos), generator=generator).tolist()]
        filled = [order[i % len(order)] for i in range(-(-len(order) // micro_size) * micro_size)]
        batches += [tuple(filled[i : i + micro_size]) for i in range(0, len(filled), micro_size)]
    return tuple(batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())
