"""What a job's processes read from their environment: one typed object, read once where a
job (or a warm worker group, or a log capture) starts. The service passes its own settings
to them as these variables when it launches a job; ``nestor train`` inherits the user's.

NESTOR_HOME is not here: ``workers.datasets.nestor_home`` is its one reader on this side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LOG_CAP_BYTES = 10 * 2**20
MIN_LOG_CAP_BYTES = 4096


@dataclass(frozen=True)
class WorkerSettings:
    """The workers' settings, each with its variable and default."""

    warm_workers: int = 4
    """NESTOR_WARM_WORKERS: warm workers kept per runtime environment (``workers.pool``)."""
    warm_idle_seconds: float = 600.0
    """NESTOR_WARM_IDLE_SECONDS: how long an idle warm worker waits for a job."""
    max_log_bytes: int = DEFAULT_LOG_CAP_BYTES
    """NESTOR_MAX_LOG_BYTES: a job's log is capped here, its oldest part dropped first (at
    least 4096; a value that is not a number keeps the default, as the cap must not fail a
    job)."""
    peak_tflops: float | None = None
    """NESTOR_PEAK_TFLOPS: the device's peak for MFU, overriding ``workers.flops``' table."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read the variables; a bad value is a ValueError naming the variable and the value
        (except the log cap's, see above)."""
        get = environ.get
        return cls(
            warm_workers=int(_number(get, "NESTOR_WARM_WORKERS", cls.warm_workers)),
            warm_idle_seconds=_number(get, "NESTOR_WARM_IDLE_SECONDS", cls.warm_idle_seconds),
            max_log_bytes=_log_cap(get("NESTOR_MAX_LOG_BYTES")),
            peak_tflops=_peak(get("NESTOR_PEAK_TFLOPS")),
        )


def _number(get, name: str, default: float) -> float:
    raw = get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {raw!r} (a number >= 0)")
    return value


def _log_cap(raw: str | None) -> int:
    try:
        return max(MIN_LOG_CAP_BYTES, int(raw)) if raw is not None else DEFAULT_LOG_CAP_BYTES
    except ValueError:
        return DEFAULT_LOG_CAP_BYTES


def _peak(raw: str | None) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid NESTOR_PEAK_TFLOPS: {raw!r} (a peak in TFLOP/s, e.g. 989.5)")
    return value
