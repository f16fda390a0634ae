"""Downsampling of metric series for charts: at most N points, each bucket's extremes kept.

The step range is cut into ``max_points // 2`` buckets of equal width and, in each, the first
point holding the bucket's minimum and the first holding its maximum are kept, so spikes
survive and a million points become a few thousand. ``min_max_downsample`` is the readable
NumPy definition; ``query_series`` computes the same points inside the database (two grouped
scans over the job's index, no rows shipped to Python beyond the result), which is what keeps
a million-point job page fast. NaN / NULL points are dropped by both once a series is
downsampled; a series short enough to be returned whole keeps them.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from .models import Metric


def bucket_width(first: int, last: int, max_points: int) -> int:
    buckets = max(1, max_points // 2)
    return -(-(last - first + 1) // buckets)  # ceil: at most `buckets` buckets


def min_max_downsample(
    steps: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: steps ascending, NaN for missing values."""
    n = len(steps)
    if n <= max_points:
        return steps, values
    width = bucket_width(int(steps[0]), int(steps[-1]), max_points)
    bucket = (steps - steps[0]) // width
    keep = []
    for b in np.unique(bucket):
        idx = np.flatnonzero((bucket == b) & ~np.isnan(values))
        if len(idx):
            keep.append(idx[np.argmin(values[idx])])  # argmin/argmax: the first one
            keep.append(idx[np.argmax(values[idx])])
    idx = np.unique(np.asarray(keep, dtype=np.int64))
    return steps[idx], values[idx]


def query_series(
    db: Session, job_id: int, key: str, max_points: int, since_step: int = 0
) -> tuple[list[int], list[float | None]]:
    """``min_max_downsample`` of one stored series, computed by the database."""
    where = and_(Metric.job_id == job_id, Metric.key == key, Metric.step > since_step)
    count, first, last = db.execute(
        select(func.count(), func.min(Metric.step), func.max(Metric.step)).where(where)
    ).one()
    if count <= max_points:
        rows = db.execute(select(Metric.step, Metric.value).where(where).order_by(Metric.step))
        steps, values = zip(*rows, strict=True) if count else ((), ())
        return list(steps), list(values)

    width = bucket_width(first, last, max_points)
    bucket = ((Metric.step - first) // width).label("bucket")
    extremes = (
        select(bucket, func.min(Metric.value).label("lo"), func.max(Metric.value).label("hi"))
        .where(where, Metric.value.is_not(None))
        .group_by(bucket)
        .subquery()
    )
    # Second scan: the first step at which each bucket reaches its minimum and its maximum.
    in_bucket = (Metric.step - first) // width == extremes.c.bucket
    rows = db.execute(
        select(
            extremes.c.lo,
            extremes.c.hi,
            func.min(case((Metric.value == extremes.c.lo, Metric.step))),
            func.min(case((Metric.value == extremes.c.hi, Metric.step))),
        )
        .join(extremes, in_bucket)
        .where(where)
        .group_by(extremes.c.bucket, extremes.c.lo, extremes.c.hi)
    ).all()
    points = {}
    for lo, hi, lo_step, hi_step in rows:
        points[lo_step] = lo
        points[hi_step] = hi
    steps = sorted(points)
    return steps, [points[s] for s in steps]
