"""Sweeps: a search space over TrainSpec fields, expanded into ordinary jobs."""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers import TrainSpec

from . import webhooks
from .capacity import Capacity, refusal
from .jobs import cancel_job, create_job
from .models import TERMINAL, Event, Job, Sweep, utcnow
from .packages import missing_package
from .schemas import JsonObject


class EarlyStopping(BaseModel):
    """Asynchronous successive halving on a reported metric."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_loss", description="a metric the trials report")
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(10, ge=1, description="steps before a trial can be stopped")
    reduction_factor: int = Field(3, ge=2)


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", min_length=1, max_length=200)
    base: JsonObject = Field(description="a TrainSpec the space's values are applied to")
    space: JsonObject = Field(
        default_factory=dict,
        description="dotted spec path -> list of values, or for random search "
        '{"uniform": [a, b]}, {"log_uniform": [a, b]}, {"choice": [...]}',
        max_length=32,
    )
    points: list[JsonObject] = Field(
        default_factory=list,
        max_length=1000,
        description="explicit combinations (dotted path -> value), each crossed with the "
        "space: for values that vary together, e.g. the best lr found for each batch size "
        '[{"batch_size": 1024, "optimizer.lr": 0.01}, ...] with space {"seed": [0, 1, 2]}',
    )
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1, le=1000, description="trials drawn by random search")
    max_concurrent: int = Field(4, ge=1, le=1000, description="trials running at once")
    early_stopping: EarlyStopping | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random search draws")

    @model_validator(mode="after")
    def _space_fits_search(self) -> SweepCreate:
        if not self.space and not self.points:
            raise ValueError("give a space, points, or both")
        for i, point in enumerate(self.points):
            if not point:
                raise ValueError(f"points[{i}]: an empty combination")
            both = sorted(set(point) & set(self.space))
            if both:
                raise ValueError(f"points[{i}]: {both} also in space; vary a path in one place")
        for path, values in self.space.items():
            if isinstance(values, dict):
                if self.search == "grid":
                    raise ValueError(f"space[{path!r}]: grid search takes a list of values")
                if len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS:
                    raise ValueError(
                        f"space[{path!r}]: a distribution is one of "
                        f"{sorted(DISTRIBUTIONS)}, got {values!r}"
                    )
                ((kind, args),) = values.items()
                check_distribution(path, kind, args)
            elif not isinstance(values, list) or not values:
                raise ValueError(f"space[{path!r}]: expected a non-empty list of values")
        grid = math.prod(len(v) for v in self.space.values()) if self.search == "grid" else 1
        if grid * max(1, len(self.points)) > 1000:
            raise ValueError("more than 1000 trials")
        return self


def check_distribution(path: str, kind: str, args: Any) -> None:
    """A clear error for arguments a distribution cannot draw from."""
    where = f"space[{path!r}]: {kind}"
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where} takes a non-empty list of values, got {args!r}")
        return
    numbers = isinstance(args, list) and len(args) == 2
    numbers = numbers and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    if not numbers or not args[0] < args[1]:
        raise ValueError(f"{where} takes [low, high], two numbers with low < high, got {args!r}")
    if kind == "log_uniform" and args[0] <= 0:
        raise ValueError(f"{where} takes [low, high] with 0 < low < high, got {args!r}")


def _uniform(rng: random.Random, args: list[float]) -> float:
    return rng.uniform(args[0], args[1])


def _log_uniform(rng: random.Random, args: list[float]) -> float:
    return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))


DISTRIBUTIONS = {
    "uniform": _uniform,
    "log_uniform": _log_uniform,
    "choice": lambda rng, args: rng.choice(args),
}


def combinations(sweep: SweepCreate) -> list[dict[str, Any]]:
    """The varied values of every trial: each point (or none) crossed with the grid's
    product, or with num_samples seeded draws."""
    return [{**point, **drawn} for point in sweep.points or [{}] for drawn in _space_values(sweep)]


def _space_values(sweep: SweepCreate) -> list[dict[str, Any]]:
    paths = list(sweep.space)
    if sweep.search == "grid":
        return [
            dict(zip(paths, combo, strict=True))
            for combo in itertools.product(*(sweep.space[p] for p in paths))
        ]
    rng = random.Random(sweep.seed)
    out = []
    for _ in range(sweep.num_samples):
        trial = {}
        for path in paths:
            values = sweep.space[path]
            if isinstance(values, list):
                trial[path] = rng.choice(values)
            else:
                ((kind, args),) = values.items()
                trial[path] = DISTRIBUTIONS[kind](rng, args)
        out.append(trial)
    return out


def compact(value: Any) -> str:
    """A varied value for a trial's name: objects as k=v lists, nulls left out."""
    if isinstance(value, dict):
        return "(" + " ".join(f"{k}={compact(v)}" for k, v in value.items() if v is not None) + ")"
    return str(value)


def apply(base: dict[str, Any], varied: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each dotted path set, e.g. {"optimizer.lr": 0.1}."""
    spec = copy.deepcopy(base)
    for path, value in varied.items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path!r}: {key!r} is not an object in the base spec")
        node[leaf] = value
    return spec


class SweepError(ValueError):
    """A trial's spec is invalid: which combination, and why."""

    def __init__(self, varied: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        super().__init__(f"invalid trial {varied}: {errors}")
        self.varied, self.errors = varied, errors


def expand(sweep: SweepCreate) -> list[tuple[dict[str, Any], TrainSpec]]:
    """Every trial's varied values and validated spec; raises SweepError on the first
    invalid combination, before anything is stored."""
    out = []
    for varied in combinations(sweep):
        try:
            spec = TrainSpec.model_validate(apply(sweep.base, varied))
        except (ValidationError, ValueError) as e:
            errors = (
                [{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
                if isinstance(e, ValidationError)
                else [{"loc": [], "msg": str(e)}]
            )
            raise SweepError(varied, errors) from None
        out.append((varied, spec))
    return out


def create_sweep(
    db: Session,
    sweep: SweepCreate,
    capacity: Capacity | None = None,
    owner_id: int | None = None,
    trials: list[tuple[dict[str, Any], TrainSpec]] | None = None,
) -> Sweep:
    """Store the sweep and queue its trials (``trials``: ``expand(sweep)`` if the caller has
    it already), or raise SweepError for the first trial that is invalid, can never run on a
    fixed cluster or names a code package that is not stored (nothing is stored then)."""
    trials = expand(sweep) if trials is None else trials
    stored: set[str] = set()
    for varied, spec in trials:
        refused = refusal(spec.model_dump(mode="json"), capacity)
        if refused is not None:
            raise SweepError(varied, [{"loc": [refused[0]], "msg": refused[1]}])
        if spec.code is not None and spec.code not in stored:
            missing = missing_package(db, spec.code)
            if missing is not None:
                raise SweepError(varied, [{"loc": ["code"], "msg": missing}])
            stored.add(spec.code)
    row = Sweep(
        name=sweep.name,
        status="running",
        priority=sweep.priority,
        spec=sweep.model_dump(mode="json"),
        owner_id=owner_id,
    )
    db.add(row)
    db.flush()
    db.add(Event(sweep_id=row.id, status="running", reason=f"{len(trials)} trials"))
    for i, (varied, spec) in enumerate(trials):
        name = f"{sweep.name}/{i}: " + ", ".join(f"{k}={compact(v)}" for k, v in varied.items())
        stored_spec = spec.model_dump(mode="json")
        if stored_spec.get("preemptible") is None:  # a sweep's trials give way by default
            stored_spec["preemptible"] = True
        create_job(
            db,
            name[:200],
            stored_spec,
            sweep.priority,
            sweep_id=row.id,
            owner_id=owner_id,
        )
    db.commit()
    return row


def varied_values(sweep: Sweep, job: Job) -> dict[str, Any]:
    """The values this trial's spec has at the sweep's varied paths."""
    out = {}
    paths = dict.fromkeys(p for point in sweep.spec.get("points", []) for p in point)
    for path in [*paths, *sweep.spec["space"]]:
        node: Any = job.spec
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        out[path] = node
    return out


def cancel_sweep(db: Session, sweep: Sweep) -> None:
    """Mark the sweep cancelled-on-request first, then cancel each trial (each a
    compare-and-set against the scheduler's claim, see jobs.cancel_job)."""
    db.execute(update(Sweep).where(Sweep.id == sweep.id).values(cancel_requested=True))
    db.commit()
    for job in db.scalars(select(Job).where(Job.sweep_id == sweep.id)).all():
        cancel_job(db, job, f"sweep {sweep.id} cancelled")
    db.refresh(sweep)


def update_sweep_status(db: Session, sweep: Sweep) -> None:
    """running until every trial has ended; then failed if one failed, cancelled if the
    sweep was cancelled, else succeeded (stopped_early trials count as done)."""
    if sweep.status != "running":
        return
    statuses = [j.status for j in db.scalars(select(Job).where(Job.sweep_id == sweep.id))]
    if not all(s in TERMINAL for s in statuses):
        return
    if sweep.cancel_requested or "cancelled" in statuses:
        status = "cancelled"
    elif "failed" in statuses:
        status = "failed"
    else:
        status = "succeeded"
    ended = db.execute(
        update(Sweep)
        .where(Sweep.id == sweep.id, Sweep.status == "running")
        .values(status=status, finished_at=utcnow())
    ).rowcount
    if ended:
        db.add(Event(sweep_id=sweep.id, status=status, reason="all trials ended"))
        webhooks.sweep_changed(db, sweep, status, Counter(statuses))
    db.commit()
    db.refresh(sweep)
