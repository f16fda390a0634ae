"""The scheduler: queued jobs onto Ray in priority-then-FIFO order as resources allow, and
every job's status kept true by reconciling with Ray (also after a service restart).

One scheduler per database (service/lease.py). A pass runs four phases, each in its own
session: ``reconcile`` (rows in line with Ray), ``asha`` (sweeps' early stopping),
``queue`` (what starts now, and why the rest waits; ``launch`` hands a job to Ray), and the
sweeps' status. Each phase is a function of its module that takes what it uses as
arguments (the Ray client, run storage, settings, the stopper, a session factory); none
sees this class. Each pass handles every job on its own: an error with one job is logged
against it and never stops the others or later passes. This class owns the cluster, its
Ray client and capacity, and the thread that runs the passes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..capacity import Capacity, Resources
from ..db import Database
from ..isolation import Isolation, secure_home
from ..models import Job, Sweep
from ..ray_cluster import RayCluster
from ..ray_jobs import RayJobs
from ..settings import Settings
from ..storage import RunStorage
from ..sweeps import update_sweep_status
from . import asha, launch, queue, reconcile

log = logging.getLogger("nestor.scheduler")
CAPACITY_TTL = 10.0  # seconds a growable cluster's resources are cached


class Scheduler:
    """The thread that runs a pass every ``scheduler_interval`` seconds, or at once when
    woken; ``run_once`` is one pass."""

    def __init__(self, settings: Settings, db: Database, cluster: RayCluster | None = None):
        self.settings = settings
        self.db = db
        self._owns_cluster = cluster is None
        self.cluster = cluster or RayCluster(settings.ray_address, settings.home_dir)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stopper = asha.stopper_for(settings.optuna_db_url)  # opened for the first sweep
        self._thread: threading.Thread | None = None
        self.ray: RayJobs | None = None
        self._capacity: tuple[float, Capacity] | None = None
        self.storage = RunStorage(settings.run_root)
        self.isolation: Isolation | None = None  # known once the cluster is

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.isolation = Isolation.detect(self.settings, self.cluster, self._owns_cluster)
        if self.isolation.mode == "uid":
            secure_home(self.settings)
        self.cluster.start()
        self.ray = RayJobs(self.cluster.dashboard_url, headers=self.cluster.headers)
        _ = self.capacity  # read once now, so the API can refuse jobs that can never fit
        self._thread = threading.Thread(target=self._loop, name="nestor-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling. An embedded cluster this service owns stops with it unless jobs
        are running on it: then it stays up, they go on, and the next start adopts it."""
        self._stop.set()
        self._wake.set()
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
            self._wake.wait(self.settings.scheduler_interval)
            self._wake.clear()

    def wake(self) -> None:
        """Run the next scheduling pass now (a job was queued), not at the next interval."""
        self._wake.set()

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
        """One pass: each phase in its own session, an error in one logged, never fatal."""
        backfill_with = self.db.sessions if self.settings.backfill else None
        handover = partial(
            launch.launch,
            ray=self.ray,
            storage=self.storage,
            settings=self.settings,
            isolation=self.isolation,
            cluster=self.cluster,
        )
        phases: dict[str, Callable[[Session], None]] = {
            "reconcile": lambda db: reconcile.reconcile(
                db, ray=self.ray, storage=self.storage, backfill_with=backfill_with
            ),
            "early_stop": lambda db: asha.early_stop(db, stopper=self._stopper, ray=self.ray),
            "start_queued": lambda db: queue.start_queued(
                db, capacity=self.capacity, launch=handover
            ),
            "update_sweeps": update_sweeps,
        }
        for name, phase in phases.items():
            with self.db.sessions() as db:
                try:
                    phase(db)
                except Exception:
                    log.exception("scheduling phase %s failed", name)


def update_sweeps(db: Session) -> None:
    """The last phase: each running sweep's status from its trials'."""
    sweeps = db.scalars(select(Sweep).where(Sweep.status == "running")).all()
    for sweep in sweeps:
        try:
            update_sweep_status(db, sweep)
        except Exception:
            log.exception("updating sweep %s failed", sweep.id)
            db.rollback()
