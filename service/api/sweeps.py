"""/v1/sweeps: create (expanded into jobs), list, show with a sortable summary, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from workers.spec import MAX_BATCH_SIZE

from ..audit import record
from ..deps import CapacityDep, ReadDep, SessionDep, SubmitDep, require_owner, wake_scheduler
from ..jobs import final_metrics
from ..models import Job, Sweep
from ..sweeps import (
    SweepCreate,
    SweepError,
    cancel_sweep,
    compact,
    create_sweep,
    expand,
    varied_values,
)
from ..targets import Cell, Recipe, cells, recipes
from .jobs import owner_filter, owner_names, refuse_bad_init, require_code_scope

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
SweepId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a sweep id")]


class SweepPublic(BaseModel):
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    priority: int
    trials: int = 0
    owner: str | None = None


class SweepList(BaseModel):
    data: list[SweepPublic]
    count: int


class Trial(BaseModel):
    job_id: int
    status: str
    varied: dict[str, Any]
    last_step: int
    reached_target_at_step: int | None = None
    final: dict[str, float | None]


class SweepDetail(SweepPublic):
    trials_summary: list[Trial]
    cells: list[Cell] | None = Field(
        None,
        description="with a stop_at target: per cell (the trials' shared configuration "
        "but for lr and seed) the steps to the target at each lr and the best lr",
    )


class SweepRecipe(BaseModel):
    sweep_id: int
    target: dict[str, Any] = Field(description="the trials' stop_at")
    batch_size: int | None = Field(None, description="the batch size asked about")
    recipes: list[Recipe]


def _public(db, sweep: Sweep) -> SweepPublic:
    count = db.scalar(select(func.count()).where(Job.sweep_id == sweep.id)) or 0
    return SweepPublic(
        id=sweep.id,
        name=sweep.name,
        status=sweep.status,
        spec=sweep.spec,
        priority=sweep.priority,
        trials=count,
        owner=owner_names(db, {sweep.owner_id}).get(sweep.owner_id),
    )


def _get(db, sweep_id: int) -> Sweep:
    sweep = db.get(Sweep, sweep_id)
    if sweep is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"sweep {sweep_id} not found")
    return sweep


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SweepPublic)
def create(
    body: SweepCreate, request: Request, db: SessionDep, token: SubmitDep, capacity: CapacityDep
) -> SweepPublic:
    """Expand the space, validate every trial's spec (422 names the combination that
    failed, and nothing is queued), and queue one job per trial."""
    try:
        trials = expand(body)
        for varied, spec in trials:
            varies_init = any(path.startswith("init_from") for path in varied)
            loc: list[str | int] = ["body", "space" if varies_init else "base"]
            where = "trial " + ", ".join(f"{k}={compact(v)}" for k, v in varied.items())
            require_code_scope(token, spec, f"{where}: " if varied else "")
            refuse_bad_init(db, request.app.state.storage, spec.model_dump(mode="json"), loc)
        sweep = create_sweep(db, body, capacity, owner_id=token.user_id, trials=trials)
    except SweepError as e:
        db.rollback()
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, {"combination": e.varied, "errors": e.errors}
        ) from None
    record(db, token, "sweep.create", f"sweep {sweep.id}", sweep.name)
    db.commit()
    wake_scheduler(request)
    return _public(db, sweep)


@router.get("", response_model=SweepList)
def list_sweeps(
    db: SessionDep,
    token: ReadDep,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    owner: Annotated[
        str | None, Query(max_length=100, description="'me', or a user's name")
    ] = None,
) -> SweepList:
    query = owner_filter(select(Sweep), token, owner, Sweep.owner_id)
    count = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(Sweep.id.desc()).offset(skip).limit(limit))
    return SweepList(data=[_public(db, s) for s in rows], count=count)


@router.get("/{sweep_id}", response_model=SweepDetail)
def show(
    sweep_id: SweepId,
    db: SessionDep,
    _: ReadDep,
    sort: Annotated[
        str | None, Query(max_length=100, description="a final metric to sort by")
    ] = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
) -> SweepDetail:
    """The sweep, and per trial its varied parameters, status and final metrics (each
    metric's value at its last reported step), sorted by ``sort`` if given."""
    sweep = _get(db, sweep_id)
    jobs = list(db.scalars(select(Job).where(Job.sweep_id == sweep.id).order_by(Job.id)))
    finals = final_metrics(db, [j.id for j in jobs])
    trials = [
        Trial(
            job_id=j.id,
            status=j.status,
            varied=varied_values(sweep, j),
            last_step=j.last_step,
            reached_target_at_step=j.reached_target_at_step,
            final=finals.get(j.id, {}),
        )
        for j in jobs
    ]
    if sort:
        missing = [t for t in trials if t.final.get(sort) is None]
        present = sorted(
            (t for t in trials if t.final.get(sort) is not None),
            key=lambda t: t.final[sort],
            reverse=order == "desc",
        )
        trials = present + missing  # trials without the metric last, whatever the order
    with_target = [j for j in jobs if j.spec.get("stop_at")]
    return SweepDetail(
        **_public(db, sweep).model_dump(),
        trials_summary=trials,
        cells=cells(sweep.spec, with_target) if with_target else None,
    )


@router.get("/{sweep_id}/recipe", response_model=SweepRecipe)
def recipe(
    sweep_id: SweepId,
    db: SessionDep,
    _: ReadDep,
    batch_size: Annotated[
        int | None,
        Query(ge=1, le=MAX_BATCH_SIZE, description="suggest an lr for this batch size"),
    ] = None,
) -> SweepRecipe:
    """The lr to use at each batch size, from a sweep that tuned the lr per batch size with
    a stop_at target: per optimizer, a power law ``lr_ref x (batch / batch_ref) **
    exponent`` fitted through the best lr of each batch size (least squares in log-log
    space), its residual, and with ``batch_size`` the lr it suggests there. 409 when the
    sweep's trials have no stop_at target."""
    sweep = _get(db, sweep_id)
    jobs = list(db.scalars(select(Job).where(Job.sweep_id == sweep.id)))
    with_target = [j for j in jobs if j.spec.get("stop_at")]
    if not with_target:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"sweep {sweep_id}'s trials have no stop_at target: a recipe fits the best lr "
            "by steps to a target",
        )
    return SweepRecipe(
        sweep_id=sweep.id,
        target=with_target[0].spec["stop_at"],
        batch_size=batch_size,
        recipes=recipes(cells(sweep.spec, with_target), batch_size),
    )


@router.post("/{sweep_id}/cancel", response_model=SweepPublic)
def cancel(sweep_id: SweepId, db: SessionDep, token: SubmitDep) -> SweepPublic:
    """Cancel every trial that has not ended (409 if the sweep already has); its owner or
    an admin."""
    sweep = _get(db, sweep_id)
    require_owner(token, sweep.owner_id, f"sweep {sweep_id}")
    if sweep.status != "running":
        raise HTTPException(status.HTTP_409_CONFLICT, f"sweep {sweep_id} is {sweep.status}")
    cancel_sweep(db, sweep)
    record(db, token, "sweep.cancel", f"sweep {sweep_id}")
    db.commit()
    return _public(db, sweep)
