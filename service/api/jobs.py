"""/v1/jobs: submit, list, show, cancel, retry, metrics, events (SSE), ingest."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers import TrainSpec

from ..audit import record
from ..auth import Principal
from ..capacity import Capacity, Resources, demand, held, refusal, shortfall, worker_range
from ..deps import (
    CapacityDep,
    ClusterDep,
    ReadDep,
    SessionDep,
    SubmitDep,
    WorkerDep,
    require_owner,
    wake_scheduler,
)
from ..downsample import query_series
from ..forecast import RATE_WINDOW, Queued, Running, forecast, steps_per_second
from ..jobs import cancel_job, create_job, final_metrics, ingest
from ..models import STATUSES, Event, Job, Metric, MetricSeries, User
from ..packages import missing_package
from ..scheduler.queue import ask_resize, handed_jobs
from ..schemas import (
    NAME_MAX,
    EventPublic,
    IngestResult,
    JobCreate,
    JobList,
    JobPublic,
    JobResize,
    MetricBatch,
    MetricsPublic,
    Series,
)
from ..storage import RunStorage, init_files
from ..streams import Cursor, StreamHub, StreamResponse, start_cursor

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_ID = 2**31 - 1  # ids and steps are 32-bit in every supported database
LATEST_KEYS = ["train_loss", "val_loss", "val_accuracy"]
LIVE = ("queued", "running")
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="a job id")]


def get_job(db: Session, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


def owner_names(db: Session, ids: set[int | None]) -> dict[int, str]:
    """User names by id, in one query."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict(db.execute(select(User.id, User.name).where(User.id.in_(wanted))).all())


def with_latest(
    db: Session,
    jobs: list[Job],
    cluster: Resources | None = None,
    names: dict[int | None, str | None] | None = None,
) -> list[JobPublic]:
    """The jobs as the API shows them: with their latest metrics, owner, and for queued and
    running jobs their place, rate and estimated start or end (``cluster``: the cluster's
    resources, None when unknown; ``names``: the owners' names, when already read)."""
    latest = final_metrics(db, [j.id for j in jobs], LATEST_KEYS)
    if names is None:
        names = owner_names(db, {j.owner_id for j in jobs})
    timing = queue_timing(db, cluster) if any(j.status in LIVE for j in jobs) else {}
    return [
        JobPublic.model_validate(j).model_copy(
            update={
                "latest": latest.get(j.id, {}),
                "owner": names.get(j.owner_id),
                **(timing.get(j.id, {}) if j.status in LIVE else {}),
            }
        )
        for j in jobs
    ]


TIMING_TTL = 1.0  # seconds the queue's estimates are reused across requests
_timing: dict[Any, tuple[float, dict[int, dict]]] = {}
_timing_lock = threading.Lock()


def queue_timing(db: Session, cluster: Resources | None) -> dict[int, dict]:
    """The queue's estimates (``_queue_timing``), computed at most once a second per
    database and cluster size: forty open job lists cost one computation, not forty."""
    key = (str(db.get_bind().url), cluster)
    now = time.monotonic()
    with _timing_lock:
        hit = _timing.get(key)
        if hit is not None and now - hit[0] < TIMING_TTL:
            return hit[1]
    value = _queue_timing(db, cluster)
    with _timing_lock:
        _timing[key] = (now, value)
    return value


def _queue_timing(db: Session, cluster: Resources | None) -> dict[int, dict]:
    """Per queued or running job: progress, queue position, steps per second, and the
    estimated start or end (service/forecast.py), as JobPublic fields."""
    live = db.scalars(
        select(Job).where(Job.status.in_(LIVE)).order_by(Job.priority.desc(), Job.id)
    ).all()
    now = datetime.now(UTC)
    running, queued, rates, started = [], [], {}, set()
    for job in live:
        try:
            handed = job.status == "running" or job.submission_id is not None
            need = held(job) if handed else demand(job.spec)  # an elastic job: its size
            max_steps = int(job.spec.get("max_steps", 1))
        except (TypeError, ValueError, KeyError):
            continue
        if handed:  # handed to Ray
            rate = job_rate(db, job.id) if job.status == "running" else None
            rates[job.id] = rate
            running.append(Running(job.id, need, max_steps - job.last_step, rate))
            started.add(job.id)
        else:
            queued.append(Queued(job.id, need, max_steps, in_sweep=job.sweep_id is not None))
    plans = forecast(cluster, running, queued)

    def at(seconds: float | None) -> datetime | None:
        return None if seconds is None else now + timedelta(seconds=seconds)

    timing = {}
    for job in live:
        plan = plans.get(job.id)
        if plan is None:
            continue
        max_steps = max(int(job.spec.get("max_steps", 1)), 1)
        timing[job.id] = {
            "progress": min(job.last_step / max_steps, 1.0),
            "queue_position": plan.position,
            "steps_per_second": rates.get(job.id),
            "estimated_start": now
            if job.id in started and job.status == "queued"
            else at(plan.start_in),
            "estimated_end": at(plan.end_in),
        }
    return timing


def job_rate(db: Session, job_id: int) -> float | None:
    """A running job's steps per second over its last reported training steps."""
    points = db.execute(
        select(Metric.step, Metric.time)
        .where(Metric.job_id == job_id, Metric.key == "train_loss")
        .order_by(Metric.step.desc())
        .limit(RATE_WINDOW)
    ).all()
    return steps_per_second([(int(s), float(t)) for s, t in points])


def refuse_unfit(capacity: Capacity | None, spec: dict, loc: list[str | int]) -> None:
    """422 naming the field when the job can never run on this (fixed) cluster."""
    refused = refusal(spec, capacity)
    if refused is not None:
        field, msg = refused
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": [*loc, field], "msg": msg, "type": "value_error"}],
        )


def refuse_missing_code(db: Session, spec: dict, loc: list[str | int]) -> None:
    """422 naming ``code`` when the spec's code package is not stored."""
    missing = missing_package(db, spec.get("code"))
    if missing is not None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": [*loc, "code"], "msg": missing, "type": "value_error"}],
        )


def refuse_bad_init(db: Session, runs: RunStorage, spec: dict, loc: list[str | int]) -> None:
    """422 naming ``init_from`` when its job does not exist or lacks the files it names."""
    init = spec.get("init_from")
    if not init:
        return
    source = db.get(Job, init["job"])
    if source is None:
        found: dict | str = f"job {init['job']} does not exist"
        field = "job"
    else:
        found = init_files(
            runs, source.id, source.run_dir, source.artifacts_deleted_at is not None, init
        )
        field = "step" if init.get("step") else "job"
    if isinstance(found, str):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": [*loc, "init_from", field], "msg": found, "type": "value_error"}],
        )


def stored_spec(spec: dict) -> TrainSpec:
    """A stored spec as today's schema reads it; 422 naming the field where it no longer
    validates (a spec stored by an older release)."""
    try:
        return TrainSpec.model_validate(spec)
    except ValidationError as e:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [
                {"loc": ["spec", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                for err in e.errors()
            ],
        ) from None


def require_code_scope(token: Principal, spec: TrainSpec, where: str = "") -> None:
    """A job that runs the submitter's own code (a package, an import path, requirements)
    or reads their files needs the ``code`` scope: with ``submit`` alone, only built-in
    models and data."""
    fields = spec.own_code()
    if fields and not token.has("code"):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this token lacks the 'code' scope, which a job that runs your own code or "
            f"reads your files needs ({where}{', '.join(fields)}); with 'submit' alone a job "
            f"uses built-in models and data sets",
        )


def owner_filter(query, token: Principal, owner: str | None, column):
    """``owner=me`` or a user's name."""
    if owner is None:
        return query
    if owner == "me":
        return query.where(column == token.user_id)
    return query.where(column == select(User.id).where(User.name == owner).scalar_subquery())


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def submit(
    body: JobCreate, request: Request, db: SessionDep, token: SubmitDep, capacity: CapacityDep
) -> JobPublic:
    """Queue a training job. The spec is validated (422 names the field) and stored as is;
    a job the cluster can never run (more workers than it has CPUs, GPUs it lacks) is
    refused when the cluster cannot grow, and so is one whose code package is not stored
    or whose ``init_from`` names a job or checkpoint that does not exist."""
    require_code_scope(token, body.spec)
    spec = body.spec.model_dump(mode="json")
    refuse_unfit(capacity, spec, ["body", "spec"])
    refuse_missing_code(db, spec, ["body", "spec"])
    refuse_bad_init(db, request.app.state.storage, spec, ["body", "spec"])
    job = create_job(db, body.name, spec, body.priority, owner_id=token.user_id, commit=False)
    record(db, token, "job.submit", f"job {job.id}", job.name)
    db.commit()  # the job, its event and the audit row: one transaction
    wake_scheduler(request)
    return JobPublic.model_validate(job).model_copy(update={"owner": token.user_name})


@router.get("", response_model=JobList)
def list_jobs(
    db: SessionDep,
    token: ReadDep,
    cluster: ClusterDep,
    status_: Annotated[
        str | None, Query(alias="status", pattern=f"^({'|'.join(STATUSES)})$")
    ] = None,
    sweep: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    owner: Annotated[
        str | None, Query(max_length=100, description="'me', or a user's name")
    ] = None,
) -> JobList:
    """Jobs, newest first, filtered by status, sweep and owner."""
    query = owner_filter(select(Job), token, owner, Job.owner_id)
    if status_:
        query = query.where(Job.status == status_)
    if sweep is not None:
        query = query.where(Job.sweep_id == sweep)
    # One read for the page, the total and the owners' names (each read is a round trip that
    # a busy PostgreSQL makes a list wait for).
    page = db.execute(
        query.add_columns(func.count().over(), User.name)
        .outerjoin(User, User.id == Job.owner_id)
        .order_by(Job.id.desc())
        .offset(skip)
        .limit(limit)
    ).all()
    if page:
        count = page[0][1]
    else:  # past the end (or nothing): the total alone
        count = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = [row[0] for row in page]
    names = {row[0].owner_id: row[2] for row in page}
    return JobList(data=with_latest(db, rows, cluster, names), count=count)


@router.get("/{job_id}", response_model=JobPublic)
def show(job_id: JobId, db: SessionDep, _: ReadDep, cluster: ClusterDep) -> JobPublic:
    return with_latest(db, [get_job(db, job_id)], cluster)[0]


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: JobId, db: SessionDep, token: SubmitDep) -> Job:
    """Cancel a queued or running job (409 if it has already ended); its owner or an admin."""
    job = get_job(db, job_id)
    require_owner(token, job.owner_id, f"job {job_id}")
    if not cancel_job(db, job, "cancelled by user"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is {job.status}; only queued or running jobs can be cancelled",
        )
    record(db, token, "job.cancel", f"job {job_id}")
    db.commit()
    return job


@router.patch("/{job_id}", response_model=JobPublic)
def resize(
    job_id: JobId, body: JobResize, db: SessionDep, token: SubmitDep, cluster: ClusterDep
) -> JobPublic:
    """Resize a running elastic job (its owner or an admin): it checkpoints at its next step
    boundary and goes on with ``num_workers`` workers, the global batch unchanged. 422 when
    the number is outside the job's range (or the job is not elastic), 409 when it is not
    running or the cluster has no room for the workers it would add."""
    job = get_job(db, job_id)
    require_owner(token, job.owner_id, f"job {job_id}")
    lo, hi = worker_range(job.spec)
    n = body.num_workers
    if lo == hi:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"num_workers={n}: job {job_id} has a fixed size ({lo}); only a job submitted "
            'with a range ("num_workers": {"min": ..., "max": ...}) can be resized',
        )
    if not lo <= n <= hi:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"num_workers={n}: outside job {job_id}'s range, {lo} to {hi}",
        )
    if job.status != "running" or job.run_dir is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} is {job.status}; only a running job resizes"
        )
    now = max(job.workers or 0, job.target_workers or 0)
    if cluster is not None and n > now:
        used = sum((held(j) for j in handed_jobs(db)), Resources())
        short = shortfall(demand(job.spec, n - now), cluster - used, free=True)
        if short is not None:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"num_workers={n}: adding {n - now} workers {short}"
            )
    ask_resize(db, job, n, f"resized by {token.user_name}", pin=True)
    record(db, token, "job.resize", f"job {job_id}", f"{now} -> {n} workers")
    db.commit()
    return with_latest(db, [job], cluster)[0]


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def retry(
    job_id: JobId, request: Request, db: SessionDep, token: SubmitDep, capacity: CapacityDep
) -> JobPublic:
    """A new queued job with the same spec (its owner or an admin; the new job is theirs)."""
    job = get_job(db, job_id)
    require_owner(token, job.owner_id, f"job {job_id}")
    require_code_scope(token, stored_spec(job.spec))
    refuse_unfit(capacity, job.spec, ["spec"])
    refuse_missing_code(db, job.spec, ["spec"])
    refuse_bad_init(db, request.app.state.storage, job.spec, ["spec"])
    suffix = f" (retry of {job.id})"
    name = job.name[: NAME_MAX - len(suffix)] + suffix
    new = create_job(
        db,
        name,
        job.spec,
        job.priority,
        sweep_id=job.sweep_id,
        owner_id=token.user_id,
        commit=False,
    )
    record(db, token, "job.retry", f"job {job_id}", f"as job {new.id}")
    db.commit()
    wake_scheduler(request)
    return JobPublic.model_validate(new).model_copy(update={"owner": token.user_name})


@router.get("/{job_id}/events/history", response_model=list[EventPublic])
def events_history(job_id: JobId, db: SessionDep, _: ReadDep) -> list[Event]:
    get_job(db, job_id)
    return list(db.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def metrics(
    job_id: JobId,
    db: SessionDep,
    _: ReadDep,
    keys: Annotated[str | None, Query(description="comma-separated; default all")] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    since_step: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> MetricsPublic:
    """Series per key, downsampled on the server (each bucket's min and max kept)."""
    get_job(db, job_id)
    wanted = [k for k in (keys or "").split(",") if k]
    if not wanted:
        wanted = list(db.scalars(select(MetricSeries.key).where(MetricSeries.job_id == job_id)))
    series = {}
    for key in wanted:
        steps, values = query_series(db, job_id, key, max_points, since_step)
        series[key] = Series(step=steps, value=values)
    return MetricsPublic(job_id=job_id, series=series)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` written in place (an OpenAPI request body
    given by hand cannot point into ``$defs``)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


async def metric_batch(request: Request) -> MetricBatch:
    """The ingest body, parsed and validated in one pass by pydantic's own JSON parser:
    the hot path of every job's metrics, where ``json.loads`` and then validation of the
    Python objects cost twice as much (0.36 against 0.19 ms for 1,000 values). Errors are
    FastAPI's usual 422, located under ``body``."""
    try:
        return MetricBatch.model_validate_json(await request.body())
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in errors]
        ) from None


@router.post(
    "/{job_id}/ingest",
    response_model=IngestResult,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline_refs(MetricBatch.model_json_schema())}
            },
        }
    },
)
def ingest_metrics(
    job_id: JobId,
    batch: Annotated[MetricBatch, Depends(metric_batch)],
    db: SessionDep,
    token: WorkerDep,
    request: Request,
) -> IngestResult:
    """Workers send metric points (idempotent: a re-sent point replaces itself) and their
    status. A worker token is valid for its own job's current attempt only (it is revoked
    when the attempt ends); an admin token may ingest too (tools, backfills)."""
    if token.role == "worker" and token.job_id != job_id:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token belongs to another job")
    if db.scalar(select(Job.id).where(Job.id == job_id)) is None:  # not the whole row
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    accepted = ingest(db, job_id, batch)
    request.app.state.ingested.inc(accepted)
    return IngestResult(accepted=accepted)


@router.get(
    "/{job_id}/events",
    response_class=StreamResponse,
    status_code=status.HTTP_200_OK,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the live stream"},
        429: {"description": "this token has too many streams open"},
    },
)
async def events(
    job_id: JobId,
    request: Request,
    token: ReadDep,
    since_step: Annotated[
        int, Query(ge=0, le=MAX_ID, description="send only metric points after this step")
    ] = 0,
    last_event_id: Annotated[
        str | None,
        Header(max_length=64, description="resume after this message's id (reconnects)"),
    ] = None,
) -> StreamResponse:
    """Server-sent events: `status` (status changes), `metrics` (new points) and `end`, live
    until the job ends; keep-alive comments in between. Every message has an `id:`; a client
    that reconnects with `Last-Event-ID` gets only what it has not seen. A page that has
    already drawn the series up to a step passes it as ``since_step`` instead of receiving
    the whole history again. At most NESTOR_MAX_STREAMS_PER_TOKEN streams per token (429)."""
    hub: StreamHub = request.app.state.streams

    def start(db: Session) -> Cursor:
        get_job(db, job_id)
        return Cursor.parse(last_event_id) or start_cursor(db, job_id, since_step)

    cursor = await hub.db(start)
    release = hub.open_or_refuse(token.token_id)
    settings = request.app.state.settings
    return StreamResponse(
        hub.stream(job_id, cursor, since_step),
        release,
        ping=settings.sse_ping_seconds,
        send_timeout=30,
        sep="\n",
        headers={"Cache-Control": "no-cache"},
    )
