"""The scheduler: queued jobs onto Ray in priority-then-FIFO order as resources allow, and
every job's status kept true by reconciling with Ray (also after a service restart)."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .auth import create_token
from .db import Database
from .jobs import transition, upsert_metrics
from .models import TERMINAL, Job, Sweep
from .ray_cluster import RayCluster
from .settings import Settings
from .sweeps import update_sweep_status

log = logging.getLogger("nestor.scheduler")


def cpus_needed(spec: dict[str, Any]) -> int:
    return int(spec.get("num_workers", 1))


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
        self._client = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.cluster.start()
        from ray.job_submission import JobSubmissionClient

        self._client = JobSubmissionClient(self.cluster.dashboard_url)
        self._thread = threading.Thread(target=self._loop, name="nestor-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if self._owns_cluster:
            self.cluster.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduling pass failed")
            self._stop.wait(self.settings.scheduler_interval)

    # ------------------------------------------------------------------ one pass
    def run_once(self) -> None:
        with self.db.sessions() as db:
            self.reconcile(db)
            self.early_stop(db)
            self.start_queued(db)
            for sweep in db.scalars(select(Sweep).where(Sweep.status == "running")).all():
                update_sweep_status(db, sweep)

    def reconcile(self, db: Session) -> None:
        """Bring running jobs' rows in line with Ray, and carry out cancel requests."""
        for job in db.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        ).all():
            try:
                info = self._client.get_job_info(job.submission_id)
            except Exception as e:  # Ray has no record: the cluster was replaced
                if "does not exist" in str(e) or "404" in str(e):
                    self._finish(db, job, "failed", f"Ray lost the job ({e})")
                continue
            state = str(info.status).split(".")[-1]
            if (job.cancel_requested or job.stop_reason) and state in ("PENDING", "RUNNING"):
                self.stop_job(job)
                continue
            if state == "RUNNING" and job.status == "queued":
                transition(db, job, "running", "Ray job started")
            elif state == "SUCCEEDED":
                result = self._result(job)
                if result.get("status") == "succeeded":
                    self._finish(db, job, "succeeded", "training finished")
                else:
                    self._finish(db, job, "failed", result.get("error") or "no result")
            elif state == "FAILED":
                result = self._result(job)
                reason = result.get("error") or info.message or "Ray job failed"
                self._finish(db, job, "failed", reason)
            elif state == "STOPPED":
                if job.stop_reason:
                    self._finish(db, job, "stopped_early", job.stop_reason)
                elif job.cancel_requested:
                    self._finish(db, job, "cancelled", "cancelled by user")
                else:
                    self._finish(db, job, "failed", "stopped outside Nestor")

    def stop_job(self, job: Job) -> None:
        """Ask Ray to stop the job's driver and workers."""
        self._client.stop_job(job.submission_id)

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
            for job in db.scalars(select(Job).where(Job.sweep_id == sweep.id)):
                if job.status == "running" and not job.stop_reason:
                    reason = self._stopper.should_stop(db, sweep, job)
                    if reason:
                        job.stop_reason = reason
                        db.commit()
                        self.stop_job(job)
                elif job.status in TERMINAL:
                    self._stopper.finish(sweep, job)

    def _result(self, job: Job) -> dict[str, Any]:
        path = Path(job.run_dir or "") / "result.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _finish(self, db: Session, job: Job, status: str, reason: str) -> None:
        """End a job: backfill any metric points the live path missed, then the status."""
        self.backfill(db, job)
        if job.status == "queued":
            transition(db, job, "running", "Ray job started")
        transition(db, job, status, reason)

    def backfill(self, db: Session, job: Job) -> None:
        path = Path(job.run_dir or "") / "metrics.jsonl"
        if not path.exists():
            return
        rows = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for key, value in rec.items():
                if key not in ("step", "time"):
                    rows.append(
                        {
                            "job_id": job.id,
                            "step": rec["step"],
                            "key": key,
                            "value": value,
                            "time": rec["time"],
                        }
                    )
        if rows:
            upsert_metrics(db, rows)
            job.last_step = max(job.last_step or 0, max(r["step"] for r in rows))
            db.commit()

    def start_queued(self, db: Session) -> None:
        """Start queued jobs, highest priority first then oldest, while CPUs allow; a job
        that does not fit blocks lower ones (no starvation of big jobs)."""
        running = db.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        ).all()
        used = sum(cpus_needed(j.spec) for j in running)
        free = self.cluster.total_cpus() - used
        # Trials running per sweep, against each sweep's max_concurrent.
        active: dict[int, int] = {}
        for j in running:
            if j.sweep_id is not None:
                active[j.sweep_id] = active.get(j.sweep_id, 0) + 1
        limits = {
            s.id: s.spec.get("max_concurrent", 1)
            for s in db.scalars(select(Sweep).where(Sweep.status == "running"))
        }
        queued = db.scalars(
            select(Job)
            .where(Job.status == "queued", Job.submission_id.is_(None))
            .order_by(Job.priority.desc(), Job.id)
        ).all()
        for job in queued:
            sweep = job.sweep_id
            if sweep is not None and active.get(sweep, 0) >= limits.get(sweep, 1):
                continue  # its sweep is at max_concurrent: other jobs may go ahead
            need = cpus_needed(job.spec)
            if need > free:
                break
            self.launch(db, job)
            free -= need
            if sweep is not None:
                active[sweep] = active.get(sweep, 0) + 1

    def launch(self, db: Session, job: Job) -> None:
        run_dir = self.settings.run_root / f"job-{job.id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(json.dumps(job.spec))
        token_file = run_dir / "worker_token"
        token = create_token(db, f"worker for job {job.id}", "worker", job_id=job.id)
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        # Unique per job row, not just per id: two Nestor databases (a second deployment, a
        # reset database, each test module's service) may share one Ray cluster. And the
        # same on every attempt, so a submission that reached Ray before a crash is adopted.
        created = job.created_at
        if created.tzinfo is not None:  # PostgreSQL answers in the session's time zone
            created = created.astimezone(UTC).replace(tzinfo=None)
        submission_id = f"nestor-job-{job.id}-{created:%Y%m%d%H%M%S%f}"
        entrypoint = (
            f"{sys.executable} -m workers.driver --job-id {job.id} "
            f"--run-dir {run_dir} --api-url {self.settings.api_url} "
            f"--token-file {token_file}"
        )
        try:
            self._client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"env_vars": {"NESTOR_HOME": str(self.settings.home_dir)}},
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            log.warning("job %s was already submitted to Ray as %s", job.id, submission_id)
        job.submission_id = submission_id
        job.run_dir = str(run_dir)
        db.commit()
        log.info("job %s submitted to Ray as %s", job.id, submission_id)
