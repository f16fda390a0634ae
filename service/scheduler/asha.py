"""Sweeps' early stopping as a scheduling phase: each running trial's metric goes to its
sweep's ASHA (Optuna's pruner, ``early_stopping``), and the trials it prunes are stopped."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models import TERMINAL, Job, Sweep
from .each import each

if TYPE_CHECKING:
    from ..early_stopping import EarlyStopper
    from ..ray_jobs import RayJobs


def stopper_for(optuna_url: str) -> Callable[[], EarlyStopper]:
    """The early stopper over Optuna's storage at ``optuna_url``, opened on the first call
    and kept: only a sweep that asks for early stopping pays for importing Optuna and
    opening its database."""

    @functools.cache
    def stopper() -> EarlyStopper:
        from ..early_stopping import EarlyStopper

        return EarlyStopper(optuna_url)

    return stopper


def early_stop(db: Session, *, stopper: Callable[[], EarlyStopper], ray: RayJobs) -> None:
    """Feed each running trial's metric to its sweep's ASHA and stop the ones it prunes
    (``ray``); close the trials of jobs that have ended."""
    sweeps = [
        sweep
        for sweep in db.scalars(select(Sweep).where(Sweep.status == "running"))
        if sweep.spec.get("early_stopping")
    ]
    if not sweeps:
        return
    early_stopper = stopper()
    for sweep in sweeps:

        def judge(job: Job, sweep: Sweep = sweep) -> None:
            if job.status == "running" and not job.stop_reason:
                reason = early_stopper.should_stop(db, sweep, job)
                if reason:
                    job.stop_reason = reason
                    db.commit()
                    ray.stop(job.submission_id)
            elif job.status in TERMINAL:
                early_stopper.finish(sweep, job)

        each(db, db.scalars(select(Job).where(Job.sweep_id == sweep.id)).all(), "ASHA", judge)
