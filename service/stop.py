"""`nestor stop`: everything at once. The caller holds the scheduler lease (the service has
stopped); this stops the embedded Ray cluster with the jobs on it and records them as
cancelled, after storing the points their runs wrote while the service was away."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sqlalchemy import select

from workers.run_dir import RunDir

from .backfill import backfill
from .db import Database
from .jobs import transition
from .models import Job
from .ray_cluster import RayCluster
from .ray_jobs import RayJobs, RayUnavailable
from .settings import Settings

REASON = "stopped with the service and its embedded Ray (`nestor stop`)"


def _stop_ray_jobs(ray: RayJobs, submissions: list[str], timeout: float = 30) -> None:
    """Stop the jobs through Ray's Jobs API first: an idle node stops in seconds, while a
    node still running tasks drains them for half a minute."""
    for sid in submissions:
        with contextlib.suppress(RayUnavailable):
            ray.stop(sid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(RayUnavailable):
            states = [ray.get(sid) for sid in submissions]
            if all(s is None or s.status not in ("PENDING", "RUNNING") for s in states):
                return
        time.sleep(0.5)


def stop_everything(settings: Settings) -> str:
    """Stop the embedded cluster and end its jobs; a sentence saying what was done."""
    if settings.ray_address:
        return (
            f"the service is stopped; jobs on the Ray cluster at {settings.ray_address} go on "
            "(the next `nestor serve` adopts them)"
        )
    cluster = RayCluster(None, settings.home_dir)
    running = cluster.adopt()
    db = Database(settings.db_url)
    ended = 0
    with db.sessions() as s:
        jobs = s.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        ).all()
        if running:
            ray_jobs = RayJobs(cluster.dashboard_url, headers=cluster.headers)
            _stop_ray_jobs(ray_jobs, [j.submission_id for j in jobs])
            cluster.stop()
        for job in jobs:
            if settings.backfill and job.run_dir:
                backfill(db.sessions, job.id, RunDir(Path(job.run_dir)).metrics)
                s.refresh(job)
            ended += transition(s, job, "cancelled", REASON)
    db.engine.dispose()
    where = (
        "the embedded Ray cluster"
        if running
        else "no embedded Ray cluster was left running (the service stops its own when no job "
        "runs on it)"
    )
    return f"stopped: the service, {where}, {ended} job(s) recorded as cancelled"
