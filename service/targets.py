"""Steps to a target, per cell of a sweep, and the lr recipe fitted from them.

A sweep whose trials stop at a target (``stop_at``) measures what Shallue et al. (2019)
measure: the steps a configuration needs to reach it. Its trials fall into *cells*: the
same configuration but for the learning rate and the seed (optimizer and batch size, in a
large-batch study). Within a cell, each lr's steps-to-target is the median over its seeds,
counted only when every seed reached the target; the cell's best lr is the one with the
fewest steps. The recipe fits ``lr = lr_ref x (batch / batch_ref) ** exponent`` through the
best lrs of each optimizer's cells by least squares in log-log space.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from workers.spec import TrainSpec, optimizer_label

from .models import Job

# Paths a cell does not vary by: the lr is what is tuned in it, the seed what is repeated;
# how the same training is run (micro-batches, workers, ZeRO stage: the loop is exact
# across them) and its step budget (a trial that reaches the target stops before it).
NOT_CELLS = (
    "optimizer.lr",
    "seed",
    "micro_batch_size",
    "num_workers",
    "zero_stage",
    "overlap_all_gather",
    "loader_workers",
    "max_steps",
    "epochs",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_restarts",
)


class LrRow(BaseModel):
    lr: float = Field(description="the peak lr the optimizer ran with (after lr_scaling)")
    seeds: list[int]
    job_ids: list[int]
    steps: list[int | None] = Field(
        description="each seed's step at the target (null: not reached); a seed's latest "
        "trial counts (a retry replaces the trial it retries)"
    )
    steps_to_target: float | None = Field(
        description="median over the seeds when every seed reached the target, else null"
    )
    unfinished: int = Field(0, description="trials still queued or running")


class Cell(BaseModel):
    key: dict[str, Any] = Field(description="what the cell's trials share: optimizer, batch...")
    optimizer: str
    batch_size: int
    lrs: list[LrRow]
    best_lr: float | None = Field(description="the lr with the fewest steps to the target")
    steps_to_target: float | None = Field(description="the best lr's median steps")
    spread: list[int] | None = Field(description="the best lr's fewest and most steps")
    best_on_edge: bool = Field(
        description="the best lr is the smallest or largest tried: widen the grid there"
    )


def _cell_paths(sweep_spec: dict[str, Any]) -> list[str]:
    space = list(sweep_spec.get("space", {}))
    points = [p for point in sweep_spec.get("points", []) for p in point]
    out = dict.fromkeys(p for p in [*points, *space] if p not in NOT_CELLS)
    out.pop("optimizer", None)  # stands in the key as its label (below)
    return list(out)


def _value(spec: dict[str, Any], path: str) -> Any:
    node: Any = spec
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def cells(sweep_spec: dict[str, Any], jobs: list[Job]) -> list[Cell]:
    """The sweep's cells, in the order their first trials were created."""
    paths = _cell_paths(sweep_spec)
    groups: dict[str, dict[float, list[Job]]] = defaultdict(lambda: defaultdict(list))
    keys: dict[str, dict[str, Any]] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        try:
            spec = TrainSpec.model_validate(job.spec)
        except ValidationError:  # stored under an older, looser schema: not comparable
            continue
        key = {"optimizer": optimizer_label(job.spec), "batch_size": spec.batch_size}
        key.update({p: _value(job.spec, p) for p in paths if p != "batch_size"})
        name = repr(sorted(key.items(), key=lambda kv: kv[0]))
        keys.setdefault(name, key)
        groups[name][spec.optimizer_spec().lr].append(job)
    return [_cell(keys[name], by_lr) for name, by_lr in groups.items()]


def _cell(key: dict[str, Any], by_lr: dict[float, list[Job]]) -> Cell:
    rows = []
    for lr in sorted(by_lr):
        # One trial per seed: the latest (a retry of a failed trial, or a re-run, replaces it).
        latest = {j.spec.get("seed", 0): j for j in sorted(by_lr[lr], key=lambda j: j.id)}
        trials = [latest[seed] for seed in sorted(latest)]
        finished = [j for j in trials if j.status in ("succeeded", "failed", "stopped_early")]
        steps = [j.reached_target_at_step if j.status == "succeeded" else None for j in trials]
        all_reached = bool(trials) and len(finished) == len(trials) and None not in steps
        rows.append(
            LrRow(
                lr=lr,
                seeds=[j.spec.get("seed", 0) for j in trials],
                job_ids=[j.id for j in trials],
                steps=steps,
                steps_to_target=statistics.median(steps) if all_reached else None,  # type: ignore[type-var]
                unfinished=sum(1 for j in trials if j.status in ("queued", "running")),
            )
        )
    reached = [r for r in rows if r.steps_to_target is not None]
    best = min(reached, key=lambda r: (r.steps_to_target, r.lr)) if reached else None
    return Cell(
        key=key,
        optimizer=key["optimizer"],
        batch_size=key["batch_size"],
        lrs=rows,
        best_lr=best.lr if best else None,
        steps_to_target=best.steps_to_target if best else None,
        spread=[min(best.steps), max(best.steps)] if best else None,  # type: ignore[type-var]
        best_on_edge=best is not None and len(rows) > 1 and best in (rows[0], rows[-1]),
    )


# ---------------------------------------------------------------------------- the recipe
class RecipePoint(BaseModel):
    batch_size: int
    best_lr: float
    fitted_lr: float


class Recipe(BaseModel):
    optimizer: str
    key: dict[str, Any] = Field(description="the cells' shared key, batch size aside")
    points: list[RecipePoint]
    batch_ref: int | None = Field(description="the smallest batch size with a best lr")
    lr_ref: float | None = Field(description="the fitted lr at batch_ref")
    exponent: float | None = Field(
        description="lr grows as batch ** exponent (0.5: the square-root rule; 1: linear)"
    )
    residual: float | None = Field(
        description="root-mean-square of log10(best lr / fitted lr): 0.1 is a factor 1.26"
    )
    suggested_lr: float | None = Field(None, description="the fit at the asked batch size")


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares of log(lr) on log(batch / batch_ref), batch_ref the smallest batch:
    (lr_ref, exponent, residual as the RMS of log10 residuals). Two or more batch sizes."""
    ref = min(b for b, _ in points)
    xs = [math.log(b / ref) for b, _ in points]
    ys = [math.log(lr) for _, lr in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - exponent * mx
    residuals = [(y - intercept - exponent * x) / math.log(10) for x, y in zip(xs, ys, strict=True)]
    return math.exp(intercept), exponent, math.sqrt(statistics.fmean(r * r for r in residuals))


def recipes(all_cells: list[Cell], batch_size: int | None = None) -> list[Recipe]:
    """One recipe per optimizer (and whatever else the cells vary but the batch size)."""
    groups: dict[str, list[Cell]] = defaultdict(list)
    keys: dict[str, dict[str, Any]] = {}
    for cell in all_cells:
        key = {k: v for k, v in cell.key.items() if k != "batch_size"}
        name = repr(sorted(key.items(), key=lambda kv: kv[0]))
        keys.setdefault(name, key)
        groups[name].append(cell)
    out = []
    for name, group in groups.items():
        points = sorted((c.batch_size, c.best_lr) for c in group if c.best_lr is not None)
        lr_ref = exponent = residual = suggested = None
        ref = points[0][0] if points else None
        if len({b for b, _ in points}) >= 2:
            lr_ref, exponent, residual = fit(points)
            if batch_size is not None:
                suggested = lr_ref * (batch_size / ref) ** exponent  # type: ignore[operator]
        out.append(
            Recipe(
                optimizer=keys[name]["optimizer"],
                key=keys[name],
                points=[
                    RecipePoint(
                        batch_size=b,
                        best_lr=lr,
                        fitted_lr=lr_ref * (b / ref) ** exponent if lr_ref else lr,  # type: ignore[operator]
                    )
                    for b, lr in points
                ],
                batch_ref=ref,
                lr_ref=lr_ref,
                exponent=exponent,
                residual=residual,
                suggested_lr=suggested,
            )
        )
    return out
