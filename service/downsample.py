"""Server-side downsampling of metric series: at most N points, each bucket's extremes kept."""

from __future__ import annotations

import itertools

import numpy as np


def min_max_downsample(
    steps: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the series into max_points // 2 buckets of consecutive points and keep, in step
    order, the points holding each bucket's minimum and maximum (NaN/None points are kept
    only if a bucket has nothing else). Spikes survive; a million points become max_points.
    """
    n = len(steps)
    if n <= max_points:
        return steps, values
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    finite = np.where(np.isnan(values), np.inf, values)
    neg = np.where(np.isnan(values), np.inf, -values)
    keep = []
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        keep.append(lo + int(np.argmin(finite[lo:hi])))
        keep.append(lo + int(np.argmin(neg[lo:hi])))
    idx = np.unique(np.asarray(keep, dtype=np.int64))
    return steps[idx], values[idx]
