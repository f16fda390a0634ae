"""Keeping every handed-over job's row true to Ray: running, finished, failed (with the
failing rank's traceback), cancelled, or lost with its cluster (requeued to resume from its
latest checkpoint, a few times). Also after a service restart: Ray's record is the truth.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from workers import deaths
from workers.elastic import read_resize
from workers.run_dir import RunDir

from ..auth import revoke_worker_tokens
from ..backfill import backfill
from ..jobs import finished_reason, transition
from ..models import Event, Job
from ..ray_jobs import RayJobs
from ..storage import RunStorage
from .each import each

Sessions = Callable[[], Session]  # a session factory, as Database.sessions
MAX_REQUEUES = 3  # times a job whose Ray record vanished is requeued before it fails
REQUEUED = (  # counted by its prefix, "requeued:"
    "requeued: Ray lost the job (its cluster was replaced); it resumes from its latest checkpoint"
)


def reconcile(
    db: Session,
    *,
    ray: RayJobs,
    storage: RunStorage,
    backfill_with: Sessions | None,
) -> None:
    """Bring the rows of jobs handed to Ray in line with Ray, and carry out cancel and
    early-stop requests. ``storage`` holds the jobs' logs; ``backfill_with`` opens the
    sessions that store an ending job's missed metric points (None: no backfill)."""
    jobs = db.scalars(
        select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
    ).all()

    def one(job: Job) -> None:
        _reconcile(db, job, ray=ray, storage=storage, backfill_with=backfill_with)

    each(db, jobs, "reconciling", one)


def _reconcile(
    db: Session,
    job: Job,
    *,
    ray: RayJobs,
    storage: RunStorage,
    backfill_with: Sessions | None,
) -> None:
    info = ray.get(job.submission_id)
    if info is None:  # Ray has no record: the cluster was replaced
        _lost(db, job, backfill_with=backfill_with)
        return
    state = info.status
    if (job.cancel_requested or job.stop_reason) and state in ("PENDING", "RUNNING"):
        ray.stop(job.submission_id)
        return

    def end(status: str, reason: str, reached: int | None = None) -> None:
        finish(db, job, status, reason, backfill_with=backfill_with, reached_target_at_step=reached)

    if state == "RUNNING" and job.status == "queued":
        transition(db, job, "running", "Ray job started")
    elif state == "SUCCEEDED":
        result = _result(job)
        if result.get("status") == "suspended":
            _suspended(db, job, result, backfill_with=backfill_with)
        elif result.get("status") == "succeeded":
            reached = result.get("reached_target_at_step")
            end("succeeded", finished_reason(job, reached), reached)
        else:
            end("failed", result.get("error") or "no result")
    elif state == "FAILED":
        # A driver killed by a signal (or with its supervisor, by Ray's memory monitor)
        # leaves no result and a log that just stops: Ray's report of its exit says why.
        died = deaths.driver_death(info.message, info.driver_exit_code)
        error = _result(job).get("error") or _log_tail(storage, job) or info.message
        end("failed", deaths.first(died, error) or "Ray job failed")
    elif state == "STOPPED":
        if job.stop_reason:
            end("stopped_early", job.stop_reason)
        elif job.cancel_requested:
            end("cancelled", "cancelled by user")
        else:
            end("failed", "stopped outside Nestor")


def _suspended(
    db: Session, job: Job, result: dict[str, Any], *, backfill_with: Sessions | None
) -> None:
    """A preempted job checkpointed and gave its workers back: it goes back to the queue
    with its progress and resumes from that step when it starts again."""
    _backfill(db, job, backfill_with)
    if job.cancel_requested:
        finish(db, job, "cancelled", "cancelled by user", backfill_with=None)
        return
    asked = read_resize(Path(job.run_dir or ""))
    why = asked.reason if asked is not None else "preempted"
    step = result.get("steps")
    transition(db, job, "queued", f"{why}: back in the queue at step {step}, resumes there")
    db.execute(update(Job).where(Job.id == job.id).values(workers=None, target_workers=None))
    db.commit()


def _lost(db: Session, job: Job, *, backfill_with: Sessions | None) -> None:
    """Ray has no record of the job: a claimed job whose submission never reached Ray
    goes back to the queue; a running one is requeued to resume from its latest
    checkpoint (a few times), or fails."""
    if job.cancel_requested:
        finish(db, job, "cancelled", "cancelled by user", backfill_with=backfill_with)
        return
    if job.status == "queued":  # claimed, never started: give the claim back
        unclaimed = db.execute(
            update(Job).where(Job.id == job.id, Job.status == "queued").values(submission_id=None)
        ).rowcount
        if unclaimed:  # the lost attempt's workers may not write into the next one
            revoke_worker_tokens(db, job.id)
        db.commit()
        return
    requeues = db.scalar(
        select(func.count())
        .select_from(Event)
        .where(Event.job_id == job.id, Event.reason.like("requeued:%"))
    )
    if requeues >= MAX_REQUEUES:
        reason = f"Ray lost the job {requeues + 1} times"
        finish(db, job, "failed", reason, backfill_with=backfill_with)
        return
    transition(db, job, "queued", REQUEUED)


def _result(job: Job) -> dict[str, Any]:
    path = RunDir(Path(job.run_dir or "")).result
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log_tail(storage: RunStorage, job: Job, lines: int = 12) -> str | None:
    """The end of the job's log, for a job that died without a result (its driver)."""
    if not job.run_dir:
        return None
    tail = storage.log(job.run_dir_path).tail(lines)
    return "the job's log ends:\n" + "\n".join(tail) if tail else None


def finish(
    db: Session,
    job: Job,
    status: str,
    reason: str,
    *,
    backfill_with: Sessions | None,
    reached_target_at_step: int | None = None,
) -> None:
    """End a job: backfill any metric points the live path missed (in sessions from
    ``backfill_with``; None: no backfill), then the status."""
    _backfill(db, job, backfill_with)
    if job.status == "queued":
        transition(db, job, "running", "Ray job started")
    transition(db, job, status, reason, reached_target_at_step=reached_target_at_step)


def _backfill(db: Session, job: Job, backfill_with: Sessions | None) -> None:
    """Store the metric points of the job's run directory that the live path missed (in
    sessions from ``backfill_with``; None: none), and re-read the job."""
    if backfill_with is not None and job.run_dir:
        backfill(backfill_with, job.id, RunDir(Path(job.run_dir)).metrics)
        db.refresh(job)
