"""A data factory: small grey images of four shapes (disc, square, cross, ring) at random
places and sizes, with noise; the label is the shape. Generated from a seed, offline."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

SHAPES = ("disc", "square", "cross", "ring")


def _draw(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(SHAPES), n)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, 1, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        r = rng.uniform(size / 6, size / 3)
        cy, cx = rng.uniform(r, size - r, 2)
        dy, dx = np.abs(yy - cy), np.abs(xx - cx)
        dist = np.hypot(dy, dx)
        if SHAPES[label] == "disc":
            mask = dist <= r
        elif SHAPES[label] == "square":
            mask = np.maximum(dy, dx) <= r * 0.8
        elif SHAPES[label] == "cross":
            mask = (np.minimum(dy, dx) <= r / 4) & (np.maximum(dy, dx) <= r)
        else:
            mask = np.abs(dist - r * 0.8) <= r / 4
        images[i, 0] = mask + rng.normal(0, 0.3, (size, size))
    return images, labels.astype(np.int64)


def load(num_samples: int = 20_000, size: int = 16, val_fraction: float = 0.1, seed: int = 0):
    """(train, val): map-style data sets of (image (1, size, size), label)."""
    images, labels = _draw(np.random.default_rng(seed), size, num_samples)
    n_val = int(num_samples * val_fraction)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])
