"""/v1/jobs: submit, list, show, cancel, retry, metrics, events (SSE), ingest."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..deps import SessionDep, TokenDep, UserDep
from ..downsample import query_series
from ..jobs import cancel_job, create_job, final_metrics, ingest
from ..models import STATUSES, Event, Job, Metric
from ..schemas import (
    EventPublic,
    IngestResult,
    JobCreate,
    JobList,
    JobPublic,
    MetricBatch,
    MetricsPublic,
    Series,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_ID = 2**31 - 1  # ids and steps are 32-bit in every supported database
LATEST_KEYS = ["train_loss", "val_loss", "val_accuracy"]
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="a job id")]


def get_job(db: Session, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


def with_latest(db: Session, jobs: list[Job]) -> list[JobPublic]:
    latest = final_metrics(db, [j.id for j in jobs], LATEST_KEYS)
    return [
        JobPublic.model_validate(j).model_copy(update={"latest": latest.get(j.id, {})})
        for j in jobs
    ]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def submit(body: JobCreate, db: SessionDep, _: UserDep) -> Job:
    """Queue a training job. The spec is validated (422 names the field) and stored as is."""
    return create_job(db, body.name, body.spec.model_dump(mode="json"), body.priority)


@router.get("", response_model=JobList)
def list_jobs(
    db: SessionDep,
    _: UserDep,
    status_: Annotated[
        str | None, Query(alias="status", pattern=f"^({'|'.join(STATUSES)})$")
    ] = None,
    sweep: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    """Jobs, newest first, filtered by status and sweep."""
    query = select(Job)
    if status_:
        query = query.where(Job.status == status_)
    if sweep is not None:
        query = query.where(Job.sweep_id == sweep)
    count = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(Job.id.desc()).offset(skip).limit(limit)).all()
    return JobList(data=with_latest(db, rows), count=count)


@router.get("/{job_id}", response_model=JobPublic)
def show(job_id: JobId, db: SessionDep, _: UserDep) -> JobPublic:
    return with_latest(db, [get_job(db, job_id)])[0]


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: JobId, db: SessionDep, _: UserDep) -> Job:
    """Cancel a queued or running job (409 if it has already ended)."""
    job = get_job(db, job_id)
    if not cancel_job(db, job, "cancelled by user"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is {job.status}; only queued or running jobs can be cancelled",
        )
    return job


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def retry(job_id: JobId, db: SessionDep, _: UserDep) -> Job:
    """A new queued job with the same spec."""
    job = get_job(db, job_id)
    return create_job(
        db, f"{job.name} (retry of {job.id})", job.spec, job.priority, sweep_id=job.sweep_id
    )


@router.get("/{job_id}/events/history", response_model=list[EventPublic])
def events_history(job_id: JobId, db: SessionDep, _: UserDep) -> list[Event]:
    get_job(db, job_id)
    return list(db.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def metrics(
    job_id: JobId,
    db: SessionDep,
    _: UserDep,
    keys: Annotated[str | None, Query(description="comma-separated; default all")] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    since_step: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> MetricsPublic:
    """Series per key, downsampled on the server (each bucket's min and max kept)."""
    get_job(db, job_id)
    wanted = [k for k in (keys or "").split(",") if k]
    if not wanted:
        wanted = list(db.scalars(select(Metric.key).where(Metric.job_id == job_id).distinct()))
    series = {}
    for key in wanted:
        steps, values = query_series(db, job_id, key, max_points, since_step)
        series[key] = Series(step=steps, value=values)
    return MetricsPublic(job_id=job_id, series=series)


@router.post("/{job_id}/ingest", response_model=IngestResult)
def ingest_metrics(
    job_id: JobId, batch: MetricBatch, db: SessionDep, token: TokenDep, request: Request
) -> IngestResult:
    """Workers send metric points (idempotent: a re-sent point replaces itself) and their
    status. A worker token is valid for its own job only."""
    if token.role == "worker" and token.job_id != job_id:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token belongs to another job")
    job = get_job(db, job_id)
    accepted = ingest(db, job, batch)
    request.app.state.ingested.inc(accepted)
    return IngestResult(accepted=accepted)


@router.get("/{job_id}/events")
async def events(
    job_id: JobId,
    request: Request,
    _: UserDep,
    since_step: Annotated[
        int, Query(ge=0, le=MAX_ID, description="send only metric points after this step")
    ] = 0,
) -> StreamingResponse:
    """Server-sent events: `status` (status changes) and `metrics` (new points), live until
    the job ends. A page that has already drawn the series up to a step passes it as
    ``since_step`` instead of receiving the whole history again."""
    db_factory = request.app.state.db.sessions
    with db_factory() as db:
        get_job(db, job_id)
        first_new = (
            db.scalar(
                select(func.min(Metric.id)).where(Metric.job_id == job_id, Metric.step > since_step)
            )
            if since_step
            else None
        )
        if since_step and first_new is None:  # nothing newer yet: start after the newest
            first_new = (
                db.scalar(select(func.max(Metric.id)).where(Metric.job_id == job_id)) or 0
            ) + 1

    async def stream():
        last_event = 0
        last_metric = first_new - 1 if first_new is not None else 0
        while True:
            with db_factory() as db:
                job = db.get(Job, job_id)
                for ev in db.scalars(
                    select(Event)
                    .where(Event.job_id == job_id, Event.id > last_event)
                    .order_by(Event.id)
                ):
                    last_event = ev.id
                    data = {"status": ev.status, "reason": ev.reason, "time": ev.time.isoformat()}
                    yield f"event: status\nid: e{ev.id}\ndata: {json.dumps(data)}\n\n"
                rows = db.execute(
                    select(Metric.id, Metric.step, Metric.key, Metric.value)
                    .where(
                        Metric.job_id == job_id,
                        Metric.id > last_metric,
                        Metric.step > since_step,
                    )
                    .order_by(Metric.id)
                    .limit(5000)
                ).all()
                if rows:
                    last_metric = rows[-1][0]
                    points = [{"step": s, "key": k, "value": v} for _, s, k, v in rows]
                    yield f"event: metrics\ndata: {json.dumps(points)}\n\n"
                done = job is None or job.status not in ("queued", "running")
            if done and not rows:
                yield "event: end\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
