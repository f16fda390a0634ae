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
# Every NESTOR_* variable a job's processes read (these and NESTOR_HOME): the only ones that
# reach them from the service's or the cluster's environment (``workers.sandbox``).
VARIABLES = (
    "NESTOR_HOME",
    "NESTOR_WARM_WORKERS",
    "NESTOR_WARM_IDLE_SECONDS",
    "NESTOR_MAX_LOG_BYTES",
    "NESTOR_PEAK_TFLOPS",
)
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
        peak = _number(get("NESTOR_PEAK_TFLOPS"), "NESTOR_PEAK_TFLOPS", positive=True)
        return cls(
            warm_workers=int(_number(get("NESTOR_WARM_WORKERS"), "NESTOR_WARM_WORKERS", 4)),
            warm_idle_seconds=_number(
                get("NESTOR_WARM_IDLE_SECONDS"), "NESTOR_WARM_IDLE_SECONDS", 600.0
            ),
            max_log_bytes=_log_cap(get("NESTOR_MAX_LOG_BYTES")),
            peak_tflops=peak,
        )


def _number(
    raw: str | None, name: str, default: float | None = None, positive: bool = False
) -> float | None:
    """``raw`` as a finite number >= 0 (> 0 when ``positive``), ``default`` when unset."""
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        expected = "a peak in TFLOP/s, e.g. 989.5" if positive else "a number >= 0"
        raise ValueError(f"Invalid {name}: {raw!r} ({expected})")
    return value


def _log_cap(raw: str | None) -> int:
    try:
        return max(MIN_LOG_CAP_BYTES, int(raw)) if raw is not None else DEFAULT_LOG_CAP_BYTES
    except ValueError:
        return DEFAULT_LOG_CAP_BYTES
