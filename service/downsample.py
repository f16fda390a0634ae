"""Downsampling of metric series for charts: at most N points, each bucket's extremes kept.

The window's steps are cut into buckets of a power-of-two width w, aligned at multiples of w:
the narrowest for which the buckets the window touches number at most ``max_points // 2``.
In each bucket, the first point holding its minimum and the first holding its maximum are
kept, so spikes survive and a million points become a few thousand. Aligned buckets also
keep a live chart still: a point arriving at the end changes the last bucket only, never the
ones before it (until the width doubles). ``min_max_downsample`` is the readable NumPy
definition; ``query_series`` computes the same points from the series' stored summaries
(``service.summaries``): a window at width w reads at most 16 summary rows per bucket
shown, plus 31 per level at its edges, however long the series is. NaN / NULL
points are dropped by both once a series is downsampled; a series short enough to be
returned whole keeps them.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy.orm import Session

from .summaries import BITS, LEVELS, Pieces, Store, cover


def bucket_width(first: int, last: int, max_points: int) -> int:
    """The narrowest power of two w such that steps first..last touch at most
    ``max_points // 2`` buckets [k*w, (k+1)*w)."""
    buckets = max(1, max_points // 2)
    w = 1
    while last // w - first // w + 1 > buckets:
        w *= 2
    return w


def _extremes(pieces: Pieces, width: int) -> tuple[list[int], list[float]]:
    made = pieces.aggregate(pieces.group // width)
    points = dict(zip(made.lo_step.tolist(), made.lo.tolist(), strict=True))
    points.update(zip(made.hi_step.tolist(), made.hi.tolist(), strict=True))
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def min_max_downsample(
    steps: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: steps ascending and distinct, NaN for missing values."""
    if len(steps) <= max_points:
        return steps, values
    width = bucket_width(int(steps[0]), int(steps[-1]), max_points)
    kept, vals = _extremes(Pieces.points(np.asarray(steps), np.asarray(values)), width)
    return np.asarray(kept, dtype=np.int64), np.asarray(vals, dtype=np.float64)


def query_series(
    db: Session, job_id: int, key: str, max_points: int, since_step: int = 0
) -> tuple[list[int], list[float | None]]:
    """``min_max_downsample`` of one stored series' steps after ``since_step``."""
    store = Store(db.connection(), job_id)
    head = store.query(
        "SELECT step, value FROM metrics WHERE job_id = ? AND key = ? AND step > ? "
        "ORDER BY step LIMIT ?",
        (job_id, key, since_step, max_points + 1),
    )
    if len(head) <= max_points:  # short enough: whole, NULLs kept
        return [s for s, _ in head], [v for _, v in head]
    first, last = head[0][0], store.last(key)
    width = bucket_width(first, last, max_points)
    top = max([0] + [level for level in LEVELS if BITS * level <= width.bit_length() - 1])
    if top == 0:  # buckets narrower than the finest summaries: fewer than 16 x max_points rows
        rows = head + store.query(  # the rest of the window, after the rows already read
            "SELECT step, value FROM metrics WHERE job_id = ? AND key = ? AND step > ? "
            "ORDER BY step",
            (job_id, key, head[-1][0]),
        )
        a = np.array(rows, dtype=np.float64)  # NULL -> NaN
        return _extremes(Pieces.points(a[:, 0].astype(np.int64), a[:, 1]), width)
    spans = [(level, key, 0, lo, hi) for level, lo, hi in cover(first, last, top)]
    parts = []
    for level, got in store.pieces(spans).items():
        got.group = got.group << (BITS * level)  # each piece's first step
        parts.append(got)
    return _extremes(Pieces.concat(parts), width)
