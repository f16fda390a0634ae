"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

from .spec import LRScheduleSpec


def lr_factor(step: int, total: int, spec: LRScheduleSpec) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``."""
    warmup = spec.warmup(total)
    if step < warmup:
        return (step + 1) / warmup
    if spec.kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = spec.min_lr_ratio
    if spec.kind == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
