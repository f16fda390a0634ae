"""What a job asks of the cluster and whether the cluster can give it: pure arithmetic, used
at submit (refuse what can never run on a fixed cluster) and by the scheduler (start what
fits now, say why the rest waits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CPUS_PER_WORKER = 1  # what the driver asks Ray for each worker (launcher.run_on_ray)


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def covers(self, need: Resources) -> bool:
        return self.cpus >= need.cpus and self.gpus >= need.gpus


@dataclass(frozen=True)
class Capacity:
    """A cluster's total resources; ``fixed`` when it cannot grow (the embedded cluster)."""

    total: Resources
    fixed: bool


def worker_range(spec: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) workers of a stored spec: a fixed job's number twice, an elastic
    job's ``{"min", "max"}``."""
    n = spec.get("num_workers", 1)
    if isinstance(n, dict):
        return int(n["min"]), int(n["max"])
    return int(n), int(n)


def demand(spec: dict[str, Any], workers: int | None = None) -> Resources:
    """One CPU per worker, and one GPU per worker with ``use_gpu``: of ``workers``, or the
    fewest the job starts with."""
    if workers is None:
        workers = worker_range(spec)[0]
    return Resources(workers * CPUS_PER_WORKER, workers if spec.get("use_gpu") else 0)


def workers_that_fit(spec: dict[str, Any], free: Resources) -> int:
    """How many of the job's workers ``free`` holds."""
    n = int(max(free.cpus, 0) // CPUS_PER_WORKER)
    return min(n, int(max(free.gpus, 0))) if spec.get("use_gpu") else n


def held(job: Any) -> Resources:
    """What a job handed to Ray holds: its workers now, or the size asked of it if more."""
    workers = max(job.workers or 0, job.target_workers or 0) or None
    return demand(job.spec, workers)


def _number(n: float) -> str:
    return str(int(n) if float(n).is_integer() else n)


def _count(n: float, what: str) -> str:
    return f"{_number(n)} {what}" + ("" if n == 1 else "s")


def shortfall(need: Resources, have: Resources, *, free: bool = False) -> str | None:
    """Why ``need`` does not fit in ``have`` ("needs 4 CPUs, the cluster has 2 CPUs"), or
    None. ``free`` words it as what is free now ("needs 4 CPUs, 2 free")."""
    if need.gpus > have.gpus:
        if free:
            held = "none" if have.gpus <= 0 else f"{_number(have.gpus)}"
            return f"needs {_count(need.gpus, 'GPU')} (use_gpu), {held} free"
        held = "none" if have.gpus <= 0 else _count(have.gpus, "GPU")
        return f"needs {_count(need.gpus, 'GPU')} (use_gpu), the cluster has {held}"
    if need.cpus > have.cpus:
        if free:
            return f"needs {_count(need.cpus, 'CPU')}, {_number(max(have.cpus, 0))} free"
        return (
            f"needs {_count(need.cpus, 'CPU')}, the cluster has {_count(max(have.cpus, 0), 'CPU')}"
        )
    return None


def refusal(spec: dict[str, Any], capacity: Capacity | None) -> tuple[str, str] | None:
    """(field, message) when a job can never run on a fixed cluster, else None."""
    if capacity is None or not capacity.fixed:
        return None
    need = demand(spec)
    why = shortfall(need, capacity.total)
    if why is None:
        return None
    field = "use_gpu" if need.gpus > capacity.total.gpus else "num_workers"
    value = spec.get(field, False if field == "use_gpu" else 1)
    if isinstance(value, dict):  # an elastic range: it needs its min
        field, value = "num_workers.min", value["min"]
    return field, f"{field}={value}: {why}; this cluster cannot grow"
