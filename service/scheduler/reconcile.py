"""Keeping every handed-over job's row true to Ray: running, finished, failed (with the
failing rank's traceback), cancelled, or lost with its cluster (requeued to resume from its
latest checkpoint, a few times). Also after a service restart: Ray's record is the truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..auth import revoke_worker_tokens
from ..backfill import backfill
from ..jobs import finished_reason, transition
from ..models import Event, Job
from .each import each

if TYPE_CHECKING:
    from .core import Scheduler

MAX_REQUEUES = 3  # times a job whose Ray record vanished is requeued before it fails
REQUEUED = (  # counted by its prefix, "requeued:"
    "requeued: Ray lost the job (its cluster was replaced); it resumes from its latest checkpoint"
)


def reconcile(scheduler: Scheduler, db: Session) -> None:
    """Bring the rows of jobs handed to Ray in line with Ray, and carry out cancel and
    early-stop requests."""
    jobs = db.scalars(
        select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
    ).all()
    each(db, jobs, "reconciling", lambda job: _reconcile(scheduler, db, job))


def _reconcile(scheduler: Scheduler, db: Session, job: Job) -> None:
    info = scheduler.ray.get(job.submission_id)
    if info is None:  # Ray has no record: the cluster was replaced
        _lost(scheduler, db, job)
        return
    state = info.status
    if (job.cancel_requested or job.stop_reason) and state in ("PENDING", "RUNNING"):
        scheduler.ray.stop(job.submission_id)
        return
    if state == "RUNNING" and job.status == "queued":
        transition(db, job, "running", "Ray job started")
    elif state == "SUCCEEDED":
        result = _result(job)
        if result.get("status") == "succeeded":
            reached = result.get("reached_target_at_step")
            finish(scheduler, db, job, "succeeded", finished_reason(job, reached), reached)
        else:
            finish(scheduler, db, job, "failed", result.get("error") or "no result")
    elif state == "FAILED":
        error = _result(job).get("error") or _log_tail(scheduler, job) or info.message
        finish(scheduler, db, job, "failed", error or "Ray job failed")
    elif state == "STOPPED":
        if job.stop_reason:
            finish(scheduler, db, job, "stopped_early", job.stop_reason)
        elif job.cancel_requested:
            finish(scheduler, db, job, "cancelled", "cancelled by user")
        else:
            finish(scheduler, db, job, "failed", "stopped outside Nestor")


def _lost(scheduler: Scheduler, db: Session, job: Job) -> None:
    """Ray has no record of the job: a claimed job whose submission never reached Ray
    goes back to the queue; a running one is requeued to resume from its latest
    checkpoint (a few times), or fails."""
    if job.cancel_requested:
        finish(scheduler, db, job, "cancelled", "cancelled by user")
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
        finish(scheduler, db, job, "failed", f"Ray lost the job {requeues + 1} times")
        return
    transition(db, job, "queued", REQUEUED)


def _result(job: Job) -> dict[str, Any]:
    path = Path(job.run_dir or "") / "result.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log_tail(scheduler: Scheduler, job: Job, lines: int = 12) -> str | None:
    """The end of the job's log, for a job that died without a result (its driver)."""
    if not job.run_dir:
        return None
    tail = scheduler.storage.log(job.run_dir_path).tail(lines)
    return "the job's log ends:\n" + "\n".join(tail) if tail else None


def finish(
    scheduler: Scheduler,
    db: Session,
    job: Job,
    status: str,
    reason: str,
    reached_target_at_step: int | None = None,
) -> None:
    """End a job: backfill any metric points the live path missed, then the status."""
    if scheduler.settings.backfill and job.run_dir:
        backfill(scheduler.db.sessions, job.id, Path(job.run_dir) / "metrics.jsonl")
        db.refresh(job)
    if job.status == "queued":
        transition(db, job, "running", "Ray job started")
    transition(db, job, status, reason, reached_target_at_step=reached_target_at_step)
