"""When a queued job should start and a running one end: the queue's order, the cluster's
resources and each running job's measured steps per second, replayed forward in time.

Pure arithmetic on what the database says now (the API calls it on every read of a job). It
follows the scheduler's rules (service/scheduler/queue.py): queued jobs start highest
priority first, then oldest; one that fits the cluster but not what is free holds back the
jobs after it; one that can never fit the cluster waits aside and blocks nobody. A job's end
is its remaining steps (``max_steps`` less the steps done) at its measured rate: an upper
bound for a job with a ``stop_at`` target, which may end sooner. What cannot be known is
None, never a guess: a running job with no rate yet, a queued job that waits for one, every
job behind a job whose length is not known, a sweep's trial (its sweep decides when it runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .capacity import Resources

RATE_WINDOW = 20  # the last steps' metric times a running job's rate is measured over


@dataclass(frozen=True)
class Running:
    id: int
    need: Resources
    remaining_steps: int
    steps_per_second: float | None


@dataclass(frozen=True)
class Queued:
    id: int
    need: Resources
    max_steps: int
    in_sweep: bool = False


@dataclass(frozen=True)
class Forecast:
    position: int | None = None  # 1-based place in the queue
    start_in: float | None = None  # seconds from now
    end_in: float | None = None


def steps_per_second(points: list[tuple[int, float]]) -> float | None:
    """A running job's rate from its latest (step, time) points: steps over the seconds
    between the newest and the oldest of them; None from fewer than two distinct times."""
    if len(points) < 2:
        return None
    newest = max(points)
    oldest = min(points)
    seconds = newest[1] - oldest[1]
    if newest[0] <= oldest[0] or seconds <= 0:
        return None
    return (newest[0] - oldest[0]) / seconds


def forecast(total: Resources | None, running: list[Running], queued: list[Queued]) -> dict:
    """Forecasts by job id. ``queued`` in the scheduler's order; ``total`` the cluster's
    resources (None: unknown, so no start can be estimated; positions still are)."""
    out: dict[int, Forecast] = {}
    frees: list[tuple[float, Resources]] = []  # (time it frees, what it frees)
    used = Resources()
    for job in running:
        end = None
        if job.steps_per_second:
            end = max(job.remaining_steps, 0) / job.steps_per_second
        out[job.id] = Forecast(end_in=end)
        used = used + job.need
        frees.append((math.inf if end is None else end, job.need))
    not_before = 0.0  # jobs behind a waiting one start no sooner than it
    for position, job in enumerate(queued, start=1):
        if total is None or job.in_sweep or not total.covers(job.need):
            out[job.id] = Forecast(position=position)
            continue
        start = _earliest(total, used, frees, job.need, not_before)
        not_before = start
        if math.isinf(start):
            out[job.id] = Forecast(position=position)
            continue
        out[job.id] = Forecast(position=position, start_in=start)
        used = used + job.need
        frees.append((math.inf, job.need))  # its rate is not known until it runs
    return out


def _earliest(
    total: Resources,
    used: Resources,
    frees: list[tuple[float, Resources]],
    need: Resources,
    not_before: float,
) -> float:
    """The first time from ``not_before`` when ``need`` fits what is free (inf: never, as
    far as is known). ``used`` counts every job in ``frees``."""
    free = total - used
    for when, freed in sorted(frees, key=lambda f: f[0]):
        if when > not_before and free.covers(need):
            return not_before
        if math.isinf(when):
            break
        free = free + freed
        not_before = max(not_before, when)
    return not_before if free.covers(need) else math.inf
