"""Sweeps' early stopping as a scheduling phase: each running trial's metric goes to its
sweep's ASHA (Optuna's pruner, ``early_stopping``), and the trials it prunes are stopped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models import TERMINAL, Job, Sweep
from .each import each

if TYPE_CHECKING:
    from .core import Scheduler


def early_stop(scheduler: Scheduler, db: Session) -> None:
    """Feed each running trial's metric to its sweep's ASHA and stop the ones it prunes;
    close the trials of jobs that have ended."""
    sweeps = [
        sweep
        for sweep in db.scalars(select(Sweep).where(Sweep.status == "running"))
        if sweep.spec.get("early_stopping")
    ]
    if not sweeps:
        return
    if scheduler._stopper is None:
        from ..early_stopping import EarlyStopper

        scheduler._stopper = EarlyStopper(scheduler.settings.optuna_db_url)
    for sweep in sweeps:

        def judge(job: Job, sweep: Sweep = sweep) -> None:
            if job.status == "running" and not job.stop_reason:
                reason = scheduler._stopper.should_stop(db, sweep, job)
                if reason:
                    job.stop_reason = reason
                    db.commit()
                    scheduler.stop_job(job)
            elif job.status in TERMINAL:
                scheduler._stopper.finish(sweep, job)

        each(db, db.scalars(select(Job).where(Job.sweep_id == sweep.id)).all(), "ASHA", judge)
