"""What a person sees in a sample grid (dreambooth.trainer.sampling.grid): its rows and
columns of images under their labels, and every label whole."""

from __future__ import annotations

import numpy as np

from dreambooth.trainer.sampling import LABEL_HEIGHT


def assert_grid(image, *, rows: int, columns: int, size: int, title: bool = True) -> None:
    """``image`` holds ``rows`` x ``columns`` images of ``size`` pixels under a label each
    (and a title band): its height is exactly that, its width at least the images' (a grid
    is as wide as its longest label), and every text band ends in white before the right
    edge: no label runs off the image."""
    top = LABEL_HEIGHT if title else 0
    assert image.size[1] == top + rows * (size + LABEL_HEIGHT), image.size
    assert image.size[0] >= columns * size, image.size
    pixels = np.asarray(image.convert("RGB"))
    bands = ([0] if title else []) + [top + r * (size + LABEL_HEIGHT) for r in range(rows)]
    for y in bands:
        inked = np.nonzero((pixels[y : y + LABEL_HEIGHT] < 128).any(axis=(0, 2)))[0]
        assert inked.size and inked.max() < pixels.shape[1] - 2, (
            y,
            inked.max() if inked.size else None,
            pixels.shape[1],
        )
