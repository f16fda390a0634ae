"""The scheduler: queued jobs onto Ray in priority-then-FIFO order as resources allow, and
every job's status kept true by reconciling with Ray (also after a service restart).

One scheduler per database (service/lease.py). Each pass handles every job on its own: an
error with one job is logged against it and never stops the others or later passes.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import run_dirs
from .auth import create_token, revoke_worker_tokens
from .backfill import backfill
from .capacity import Capacity, Resources, demand, shortfall
from .db import Database
from .jobs import transition
from .models import TERMINAL, Event, Job, Sweep
from .packages import ray_working_dir
from .ray_cluster import RayCluster
from .ray_jobs import RayJobs
from .settings import Settings
from .storage import RunStorage, init_files
from .sweeps import update_sweep_status

log = logging.getLogger("nestor.scheduler")
MAX_REQUEUES = 3  # times a job whose Ray record vanished is requeued before it fails
CAPACITY_TTL = 10.0  # seconds a growable cluster's resources are cached


def submission_id(job: Job) -> str:
    """Unique per job row, not just per id: two Nestor databases (a second deployment, a
    reset database, each test module's service) may share one Ray cluster or one storage.
    And the same on every attempt, so a submission that reached Ray before a crash is
    adopted, and a requeued job finds its own run directory and checkpoints again."""
    created = job.created_at
    if created.tzinfo is not None:  # PostgreSQL answers in the session's time zone
        created = created.astimezone(UTC).replace(tzinfo=None)
    return f"nestor-job-{job.id}-{created:%Y%m%d%H%M%S%f}"


def job_runtime_env(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Ray's runtime environment for a job: Nestor's home for the workers, the job's code
    package as its working directory (Ray uploads the stored zip to the cluster and unpacks
    it on every node, so no node needs a shared code directory), its pip requirements."""
    env: dict[str, Any] = {
        "env_vars": {
            "NESTOR_HOME": str(settings.home_dir),
            "NESTOR_MAX_LOG_BYTES": str(settings.max_log_bytes),
        }
    }
    if spec.get("code"):
        env["working_dir"] = str(ray_working_dir(settings.packages_dir, spec["code"]))
    if spec.get("requirements"):
        env["pip"] = list(spec["requirements"])
    return env


def each(db: Session, jobs: Iterable[Job], what: str, fn: Callable[[Job], None]) -> None:
    """``fn(job)`` for every job, an error with one logged and rolled back, never fatal."""
    for job in jobs:
        try:
            fn(job)
        except Exception:
            log.exception("%s job %s failed; going on with the others", what, job.id)
            db.rollback()


def _demand_or_none(job: Job) -> Resources | None:
    try:
        return demand(job.spec)
    except (TypeError, ValueError):
        log.warning("job %s has an unreadable spec; counting no resources for it", job.id)
        return None


@dataclass
class _Queue:
    """One pass over the queue: what is free, trials running per sweep, and why the jobs
    after a waiting one wait too."""

    free: Resources
    active: dict[int, int] = field(default_factory=dict)
    limits: dict[int, int] = field(default_factory=dict)
    blocked: str | None = None

    def take(self, job: Job, need: Resources | None) -> None:
        if need is not None:
            self.free = self.free - need
        if job.sweep_id is not None:
            self.active[job.sweep_id] = self.active.get(job.sweep_id, 0) + 1


class Scheduler:
    """A background thread; ``run_once`` is one pass (tests call it directly)."""

    def __init__(self, settings: Settings, db: Database, cluster: RayCluster | None = None):
        self.settings = settings
        self.db = db
        self._owns_cluster = cluster is None
        self.cluster = cluster or RayCluster(settings.ray_address, settings.home_dir)
        self._stop = threading.Event()
        self._stopper = None  # early stopping, created for the first sweep that asks
        self._thread: threading.Thread | None = None
        self.ray: RayJobs | None = None
        self._capacity: tuple[float, Capacity] | None = None
        self.storage = RunStorage(settings.run_root)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.cluster.start()
        self.ray = RayJobs(self.cluster.dashboard_url, headers=self.cluster.headers)
        _ = self.capacity  # read once now, so the API can refuse jobs that can never fit
        self._thread = threading.Thread(target=self._loop, name="nestor-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling. An embedded cluster this service owns stops with it unless jobs
        are running on it: then it stays up, they go on, and the next start adopts it."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if not (self._owns_cluster and self.cluster.embedded):
            return
        active = self.active_jobs()
        if active:
            print(
                f"nestor: {len(active)} job(s) still running on the embedded Ray "
                f"({self.cluster.gcs_address}: jobs {', '.join(map(str, active))}); they go on, "
                "and the next `nestor serve` adopts them. `nestor stop` stops everything.",
                file=sys.stderr,
                flush=True,
            )
            return
        self.cluster.stop()

    def active_jobs(self) -> list[int]:
        """Ids of jobs handed to Ray that have not ended."""
        with self.db.sessions() as db:
            return list(
                db.scalars(
                    select(Job.id).where(
                        Job.status.in_(("queued", "running")), Job.submission_id.is_not(None)
                    )
                )
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduling pass failed")
            self._stop.wait(self.settings.scheduler_interval)

    # ------------------------------------------------------------------ capacity
    @property
    def capacity(self) -> Capacity:
        """The cluster's total resources (a growable cluster's re-read every few seconds)."""
        now = time.monotonic()
        if self._capacity is None or (
            not self._capacity[1].fixed and now - self._capacity[0] > CAPACITY_TTL
        ):
            res = self.cluster.resources()
            total = Resources(res.get("CPU", 0.0), res.get("GPU", 0.0))
            self._capacity = (now, Capacity(total, fixed=self.cluster.embedded))
        return self._capacity[1]

    # ------------------------------------------------------------------ one pass
    def run_once(self) -> None:
        for phase in (self.reconcile, self.early_stop, self.start_queued, self.update_sweeps):
            with self.db.sessions() as db:
                try:
                    phase(db)
                except Exception:
                    log.exception("scheduling phase %s failed", phase.__name__)

    def update_sweeps(self, db: Session) -> None:
        sweeps = db.scalars(select(Sweep).where(Sweep.status == "running")).all()
        for sweep in sweeps:
            try:
                update_sweep_status(db, sweep)
            except Exception:
                log.exception("updating sweep %s failed", sweep.id)
                db.rollback()

    def reconcile(self, db: Session) -> None:
        """Bring the rows of jobs handed to Ray in line with Ray, and carry out cancel and
        early-stop requests."""
        jobs = db.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        ).all()
        each(db, jobs, "reconciling", lambda job: self._reconcile(db, job))

    def _reconcile(self, db: Session, job: Job) -> None:
        info = self.ray.get(job.submission_id)
        if info is None:  # Ray has no record: the cluster was replaced
            self._lost(db, job)
            return
        state = info.status
        if (job.cancel_requested or job.stop_reason) and state in ("PENDING", "RUNNING"):
            self.ray.stop(job.submission_id)
            return
        if state == "RUNNING" and job.status == "queued":
            transition(db, job, "running", "Ray job started")
        elif state == "SUCCEEDED":
            result = self._result(job)
            if result.get("status") == "succeeded":
                self._finish(db, job, "succeeded", "training finished")
            else:
                self._finish(db, job, "failed", result.get("error") or "no result")
        elif state == "FAILED":
            error = self._result(job).get("error") or self._log_tail(job) or info.message
            self._finish(db, job, "failed", error or "Ray job failed")
        elif state == "STOPPED":
            if job.stop_reason:
                self._finish(db, job, "stopped_early", job.stop_reason)
            elif job.cancel_requested:
                self._finish(db, job, "cancelled", "cancelled by user")
            else:
                self._finish(db, job, "failed", "stopped outside Nestor")

    def _lost(self, db: Session, job: Job) -> None:
        """Ray has no record of the job: a claimed job whose submission never reached Ray
        goes back to the queue; a running one is requeued to resume from its latest
        checkpoint (a few times), or fails."""
        if job.cancel_requested:
            self._finish(db, job, "cancelled", "cancelled by user")
            return
        requeues = db.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.job_id == job.id, Event.reason.like("requeued:%"))
        )
        if job.status == "running" and requeues >= MAX_REQUEUES:
            self._finish(db, job, "failed", f"Ray lost the job {requeues + 1} times")
            return
        was = job.status
        changed = db.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == was)
            .values(submission_id=None, status="queued")
        ).rowcount
        if changed and was == "running":
            db.add(
                Event(
                    job_id=job.id,
                    status="queued",
                    reason="requeued: Ray lost the job (its cluster was replaced); it resumes "
                    "from its latest checkpoint",
                )
            )
        db.commit()

    def stop_job(self, job: Job) -> None:
        """Ask Ray to stop the job's driver and workers."""
        self.ray.stop(job.submission_id)

    def early_stop(self, db: Session) -> None:
        """Feed each running trial's metric to its sweep's ASHA and stop the ones it prunes;
        close the trials of jobs that have ended."""
        sweeps = [
            s
            for s in db.scalars(select(Sweep).where(Sweep.status == "running"))
            if s.spec.get("early_stopping")
        ]
        if not sweeps:
            return
        if self._stopper is None:
            from .early_stopping import EarlyStopper

            self._stopper = EarlyStopper(self.settings.optuna_db_url)
        for sweep in sweeps:

            def judge(job: Job, sweep: Sweep = sweep) -> None:
                if job.status == "running" and not job.stop_reason:
                    reason = self._stopper.should_stop(db, sweep, job)
                    if reason:
                        job.stop_reason = reason
                        db.commit()
                        self.stop_job(job)
                elif job.status in TERMINAL:
                    self._stopper.finish(sweep, job)

            each(db, db.scalars(select(Job).where(Job.sweep_id == sweep.id)).all(), "ASHA", judge)

    def _result(self, job: Job) -> dict[str, Any]:
        path = Path(job.run_dir or "") / "result.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _log_tail(self, job: Job, lines: int = 12) -> str | None:
        """The end of the job's log, for a job that died without a result (its driver)."""
        if not job.run_dir:
            return None
        tail = self.storage.log(job.run_dir_path).tail(lines)
        return "the job's log ends:\n" + "\n".join(tail) if tail else None

    def init_from(self, db: Session, job: Job, run_dir: Path) -> str | None:
        """Write ``init_from.json`` for a job that starts from another's weights; the
        reason it cannot, if the other job's files are gone."""
        init = job.spec.get("init_from")
        if not init:
            return None
        source = db.get(Job, init["job"])
        if source is None:
            return f"init_from: job {init['job']} does not exist"
        found = init_files(
            self.storage,
            source.id,
            source.run_dir,
            source.artifacts_deleted_at is not None,
            init,
        )
        if isinstance(found, str):
            return f"init_from {found}"
        run_dirs.write_json(run_dir / "init_from.json", found)
        return None

    def _finish(self, db: Session, job: Job, status: str, reason: str) -> None:
        """End a job: backfill any metric points the live path missed, then the status."""
        if self.settings.backfill and job.run_dir:
            backfill(self.db.sessions, job.id, Path(job.run_dir) / "metrics.jsonl")
            db.refresh(job)
        if job.status == "queued":
            transition(db, job, "running", "Ray job started")
        transition(db, job, status, reason)

    # ------------------------------------------------------------------ the queue
    def start_queued(self, db: Session) -> None:
        """Start queued jobs, highest priority first then oldest, while the cluster's free
        CPUs and GPUs allow. A job that fits the cluster but not its free resources holds
        back the jobs after it (no starvation of big jobs); one that cannot fit the cluster
        at all (it may grow) waits aside and the jobs after it still start. Every waiting
        job says why in ``pending_reason``."""
        capacity = self.capacity
        queue = _Queue(free=capacity.total)
        handed = db.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        ).all()
        for j in handed:
            queue.take(j, _demand_or_none(j))
        queue.limits = {
            s.id: s.spec.get("max_concurrent", 1)
            for s in db.scalars(select(Sweep).where(Sweep.status == "running"))
        }
        queued = db.scalars(
            select(Job)
            .where(Job.status == "queued", Job.submission_id.is_(None))
            .order_by(Job.priority.desc(), Job.id)
        ).all()

        def consider(job: Job) -> None:
            try:
                self._consider(db, job, capacity, queue)
            except Exception as e:
                db.rollback()
                self._pending(db, job, f"cannot be scheduled ({type(e).__name__}: {e})")
                raise

        each(db, queued, "scheduling", consider)

    def _consider(self, db: Session, job: Job, capacity: Capacity, queue: _Queue) -> None:
        """Start ``job`` if it may start now, else record why it waits."""
        if job.cancel_requested:
            transition(db, job, "cancelled", "cancelled by user", unclaimed=True)
            return
        need = demand(job.spec)
        never = shortfall(need, capacity.total)
        if never is not None:
            self._pending(db, job, f"{never}; waiting for the cluster to grow")
            return
        if queue.blocked is not None:
            self._pending(db, job, queue.blocked)
            return
        sweep = job.sweep_id
        if sweep is not None and queue.active.get(sweep, 0) >= queue.limits.get(sweep, 1):
            self._pending(db, job, f"its sweep runs {queue.limits.get(sweep, 1)} trials at a time")
            return  # other jobs may go ahead
        short = shortfall(need, queue.free, free=True)
        if short is not None:
            self._pending(db, job, short)
            queue.blocked = f"behind job {job.id}, which waits for resources"
            return
        try:
            launched = self.launch(db, job)
        except Exception as e:
            log.exception("launching job %s failed", job.id)
            db.rollback()
            self._pending(db, job, f"could not start on Ray ({type(e).__name__}: {e})")
            return
        if launched:
            queue.take(job, need)

    def _pending(self, db: Session, job: Job, reason: str) -> None:
        if job.pending_reason != reason:
            db.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued")
                .values(pending_reason=reason[:500])
            )
            db.commit()

    def launch(self, db: Session, job: Job) -> bool:
        """Claim the queued job (compare-and-set, so a cancel that came first wins), then
        hand it to Ray. False if it was no longer ours to start."""
        sid = submission_id(job)
        try:
            run_dir = run_dirs.prepare(self.settings.run_root, job.id, sid, job.spec)
        except run_dirs.RunDirTaken as e:
            transition(db, job, "failed", str(e), unclaimed=True)
            return False
        claimed = db.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", Job.submission_id.is_(None))
            .values(submission_id=sid, run_dir=str(run_dir), pending_reason=None)
        ).rowcount
        db.commit()
        if not claimed:  # cancelled (or claimed elsewhere) meanwhile: launch nothing
            return False
        db.refresh(job)
        refused = self.init_from(db, job, run_dir)
        if refused:
            transition(db, job, "failed", refused)
            return False
        token_file = run_dir / "worker_token"
        revoke_worker_tokens(db, job.id)  # an earlier attempt's token ends with it
        token = create_token(
            db, f"worker for job {job.id}", "worker", job_id=job.id, submission_id=sid
        )
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
                self.settings.api_url,
                "--token-file",
                str(token_file),
            ]
        )
        try:
            runtime_env = job_runtime_env(job.spec, self.settings)
        except FileNotFoundError as e:
            transition(db, job, "failed", str(e))
            return False
        try:
            submitted = self.ray.submit(sid, entrypoint, runtime_env)
        except Exception:
            # Not on Ray: back to the queue (unless a cancel came in meanwhile).
            db.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued")
                .values(submission_id=None)
            )
            db.commit()
            raise
        if not submitted:
            log.warning("job %s was already submitted to Ray as %s", job.id, sid)
        log.info("job %s submitted to Ray as %s", job.id, sid)
        db.refresh(job)
        if job.cancel_requested:  # cancelled while it was being handed over
            self.ray.stop(sid)
        return True
