"""Launching a job: claim it, prepare its run directory and worker token, hand it to Ray.

A launch is idempotent per attempt: the submission id is the same on every attempt, so a
submission that reached Ray before a crash is adopted, not repeated; and a job whose
submission fails goes back to the queue.
"""

from __future__ import annotations

import logging
import shlex
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from workers.elastic import write_resize
from workers.run_dir import RunDir
from workers.sandbox import Sandbox
from workers.spec import HOME_VARIABLE

from .. import run_dirs
from ..auth import create_token, revoke_worker_tokens
from ..capacity import worker_range
from ..isolation import Isolation, prepare_job
from ..jobs import transition
from ..models import Event, Job
from ..packages import ray_working_dir
from ..ray_cluster import RayCluster
from ..ray_jobs import RayJobs
from ..settings import Settings
from ..storage import RunStorage, init_files

log = logging.getLogger("nestor.scheduler")


def submission_id(job: Job) -> str:
    """Unique per job row, not just per id: two Nestor databases (a second deployment, a
    reset database, each test module's service) may share one Ray cluster or one storage.
    And the same on every attempt, so a submission that reached Ray before a crash is
    adopted, and a requeued job finds its own run directory and checkpoints again."""
    created = job.created_at
    if created.tzinfo is not None:  # PostgreSQL answers in the session's time zone
        created = created.astimezone(UTC).replace(tzinfo=None)
    return f"nestor-job-{job.id}-{created:%Y%m%d%H%M%S%f}"


def fixed_size(job: Job) -> dict[str, int]:
    """A fixed job's workers, recorded at launch (an elastic job reports its own)."""
    lo, hi = worker_range(job.spec)
    return {"workers": lo} if lo == hi else {}


PREEMPTED = "preempted"  # the prefix of the event that queues a preempted job again


def attempt_id(db: Session, job: Job, base: str) -> str:
    """The Ray submission id of this launch: the job's own, or after each preemption a new
    one (``-r1``, ``-r2``: Ray keeps the finished attempt's record under the old one). The
    run directory stays the job's own, so every attempt resumes from its checkpoints."""
    resumes = db.scalar(
        select(func.count())
        .select_from(Event)
        .where(Event.job_id == job.id, Event.reason.like(f"{PREEMPTED}%"))
    )
    return f"{base}-r{resumes}" if resumes else base


def job_runtime_env(
    spec: dict[str, Any], settings: Settings, sandbox: Sandbox | None = None
) -> dict[str, Any]:
    """Ray's runtime environment for a job: Nestor's home for the workers, the job's code
    package as its working directory (Ray uploads the stored zip to the cluster and unpacks
    it on every node, so no node needs a shared code directory), its pip requirements; and
    the command every process of the job starts through (``sandbox``; no warm workers in a
    real one: a worker kept for the next job would carry this job's sandbox into it)."""
    env_vars = {
        HOME_VARIABLE: str(settings.home_dir),
        "NESTOR_MAX_LOG_BYTES": str(settings.max_log_bytes),
        "NESTOR_WARM_WORKERS": str(0 if sandbox and not sandbox.plain else settings.warm_workers),
        "NESTOR_WARM_IDLE_SECONDS": str(settings.warm_idle_seconds),
    }
    env: dict[str, Any] = {"env_vars": env_vars}
    if sandbox is not None:
        env["py_executable"] = sandbox.py_executable()
    if spec.get("code"):
        env["working_dir"] = str(ray_working_dir(settings.packages_dir, spec["code"]))
    if spec.get("requirements"):
        env["pip"] = list(spec["requirements"])
    return env


def init_from(db: Session, job: Job, run_dir: Path, *, storage: RunStorage) -> str | list[str]:
    """Write ``init_from.json`` for a job that starts from another's weights (found in
    ``storage``): the files it reads, or the reason it cannot, if the other job's files are
    gone."""
    init = job.spec.get("init_from")
    if not init:
        return []
    source = db.get(Job, init["job"])
    if source is None:
        return f"init_from: job {init['job']} does not exist"
    found = init_files(
        storage,
        source.id,
        source.run_dir,
        source.artifacts_deleted_at is not None,
        init,
    )
    if isinstance(found, str):
        return f"init_from {found}"
    run_dirs.write_json(RunDir(run_dir).init_from, found)
    return [path for key in ("model", "optimizer") if (path := found.get(key))]


def launch(
    db: Session,
    job: Job,
    *,
    ray: RayJobs,
    storage: RunStorage,
    settings: Settings,
    isolation: Isolation | None = None,
    cluster: RayCluster | None = None,
) -> bool:
    """Claim the queued job (compare-and-set, so a cancel that came first wins), then
    hand it to ``ray``, its processes in their sandbox where ``isolation`` is on. False if
    it was no longer ours to start."""
    base = submission_id(job)
    sid = attempt_id(db, job, base)
    try:
        run_dir = run_dirs.prepare(settings.run_root, job.id, base, job.spec)
    except run_dirs.RunDirTaken as e:
        transition(db, job, "failed", str(e), unclaimed=True)
        return False
    claimed = db.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued", Job.submission_id.is_(None))
        .values(submission_id=sid, run_dir=str(run_dir), pending_reason=None, **fixed_size(job))
    ).rowcount
    db.commit()
    if not claimed:  # cancelled (or claimed elsewhere) meanwhile: launch nothing
        return False
    db.refresh(job)
    reads = init_from(db, job, run_dir, storage=storage)
    if isinstance(reads, str):
        transition(db, job, "failed", reads)
        return False
    if sid != base:  # resuming after a preemption: its request and result are done with
        RunDir(run_dir).resize.unlink(missing_ok=True)
        RunDir(run_dir).result.unlink(missing_ok=True)
    if job.target_workers:  # elastic: the size the queue found room for
        write_resize(run_dir, job.target_workers, f"started on {job.target_workers}")
    token_file = RunDir(run_dir).worker_token
    revoke_worker_tokens(db, job.id)  # an earlier attempt's token ends with it
    token = create_token(db, f"worker for job {job.id}", "worker", job_id=job.id, submission_id=sid)
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    entrypoint = shlex.join(
        [
            sys.executable,
            "-m",
            "workers.driver",
            "--job-id",
            str(job.id),
            "--run-dir",
            str(run_dir),
            "--api-url",
            settings.api_url,
            "--token-file",
            str(token_file),
        ]
    )
    sandbox = None
    if isolation is not None and cluster is not None:
        sandbox = prepare_job(
            isolation,
            settings=settings,
            cluster=cluster,
            submission_id=sid,
            run_dir=run_dir,
            init_files=reads,
        )
    try:
        runtime_env = job_runtime_env(job.spec, settings, sandbox)
    except FileNotFoundError as e:
        transition(db, job, "failed", str(e))
        return False
    try:
        submitted = ray.submit(sid, entrypoint, runtime_env)
    except Exception:
        # Not on Ray: back to the queue (unless a cancel came in meanwhile).
        db.execute(
            update(Job).where(Job.id == job.id, Job.status == "queued").values(submission_id=None)
        )
        db.commit()
        raise
    if not submitted:
        log.warning("job %s was already submitted to Ray as %s", job.id, sid)
    log.info("job %s submitted to Ray as %s", job.id, sid)
    db.refresh(job)
    if job.cancel_requested:  # cancelled while it was being handed over
        ray.stop(sid)
    return True
