"""The FastAPI application: routers, auth, limits, Prometheus metrics, lifespan."""

from __future__ import annotations

import gc
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from sqlalchemy import func, select

from . import dashboard
from .api import jobs, outputs, packages, sweeps, users, webhooks
from .auth import ensure_admin_token
from .db import MAX_OVERFLOW, POOL_SIZE, Database, upgrade
from .deps import ReadDep
from .guard import BodyLimit, RequestGuard
from .lease import Lease
from .lease import acquire as acquire_lease
from .models import STATUSES, Job
from .ray_cluster import RayCluster
from .settings import Settings
from .storage import RunStorage
from .streams import StreamHub
from .webhook_sender import WebhookSender


def create_app(
    settings: Settings | None = None,
    *,
    scheduler: bool = True,
    cluster: RayCluster | None = None,
    announce: bool = False,
    lease: Lease | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the app. ``scheduler=False`` serves the API without launching jobs (tests of
    the API alone, or a second API replica); ``cluster`` schedules onto a Ray cluster that
    someone else started and stops. With a scheduler, the database's scheduler lease is
    taken before anything else starts (``lease``: one the caller already holds).
    ``freeze_heap``: for a server process of its own (`nestor serve`), see below."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        held = (lease or acquire_lease(settings.db_url)) if scheduler else None
        try:
            upgrade(settings.db_url)  # Alembic owns the schema
            with app.state.db.sessions() as db:
                token_file = ensure_admin_token(db, settings.home_dir, settings.admin_token)
            app.state.admin_token_file = token_file
            if scheduler:
                from .scheduler import Scheduler

                app.state.scheduler = Scheduler(settings, app.state.db, cluster)
                app.state.scheduler.start()
                # Webhooks are sent where the scheduler runs: one sender per database.
                app.state.webhooks = WebhookSender(settings, app.state.db, app.state.signing_key)
                app.state.webhooks.start()
            if announce:
                where = token_file or "NESTOR_ADMIN_TOKEN"
                ray = ""
                if scheduler:
                    used = app.state.scheduler.cluster
                    how = "adopted the embedded Ray left running at" if used.adopted else "Ray"
                    ray = f"; {how} {used.gcs_address or used.dashboard_url}"
                if scheduler:
                    print(app.state.scheduler.isolation.line(), file=sys.stderr, flush=True)
                print(
                    f"nestor: serving on http://{settings.host}:{settings.port} (docs at /docs, "
                    f"database {settings.db_url.split('@')[-1]}){ray}; admin token in {where}",
                    file=sys.stderr,
                    flush=True,
                )
            if freeze_heap:
                # Everything imported and built at start (torch, Ray, SQLAlchemy: ~400k
                # objects) leaves the garbage collector's view: a full collection of it took
                # ~170 ms, a pause every request waited out. Requests' own garbage is
                # still collected.
                gc.collect()
                gc.freeze()
            yield
        finally:
            if app.state.webhooks is not None:
                app.state.webhooks.stop()
            if scheduler and getattr(app.state, "scheduler", None) is not None:
                app.state.scheduler.stop()
            if held is not None:
                held.release()

    app = FastAPI(
        title="Nestor",
        version="0.1.0",
        lifespan=lifespan,
        description="Large-batch distributed training with modern optimizers.",
    )
    app.state.settings = settings
    app.state.db = Database(settings.db_url)
    app.state.scheduler = None
    app.state.webhooks = None  # the webhook sender, beside the scheduler
    app.state.storage = RunStorage(settings.run_root)
    app.state.signing_key = outputs.signing_key(settings.home_dir)
    app.state.streams = StreamHub(
        app.state.db.sessions,
        poll_interval=settings.stream_poll_seconds,
        max_per_token=settings.max_streams_per_token,
    )
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        route_limits={
            ("POST", "/v1/packages"): BodyLimit(
                settings.max_package_bytes, "NESTOR_MAX_PACKAGE_BYTES"
            )
        },
    )
    registry = CollectorRegistry()
    app.state.ingested = Counter(
        "nestor_metric_points_ingested", "metric points stored", registry=registry
    )
    jobs_gauge = Gauge("nestor_jobs", "jobs by status", ["status"], registry=registry)
    queue_gauge = Gauge("nestor_queue_length", "queued jobs", registry=registry)
    pool = app.state.db.engine.pool
    Gauge(
        "nestor_db_connections_in_use", "pooled database connections checked out", registry=registry
    ).set_function(lambda: float(getattr(pool, "checkedout", lambda: 0)()))
    Gauge(
        "nestor_db_pool_limit", "most pooled connections (pool size + overflow)", registry=registry
    ).set(POOL_SIZE + MAX_OVERFLOW)
    Gauge("nestor_live_streams", "open event streams", registry=registry).set_function(
        lambda: float(sum(app.state.streams.open_per_token.values()))
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # 422 with the field path and the reason for each error; never echo huge inputs.
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        """Liveness: no auth, no database, no worker thread: it answers while the event
        loop runs, however busy the thread pool and the database are."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["meta"], response_class=Response)
    def prometheus(_: ReadDep) -> Response:
        """Prometheus text format: jobs by status, queue length, points ingested."""
        with app.state.db.sessions() as db:
            counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for s in STATUSES:
            jobs_gauge.labels(status=s).set(counts.get(s, 0))
        queue_gauge.set(counts.get("queued", 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(jobs.router)
    app.include_router(outputs.router)
    app.include_router(sweeps.router)
    app.include_router(packages.router)
    app.include_router(webhooks.router)
    for router in (users.users, users.tokens, users.me, users.audit):
        app.include_router(router)
    dashboard.mount(app)
    return app
