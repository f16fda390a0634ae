"""The queue: queued jobs start in priority-then-FIFO order while the cluster's free CPUs
and GPUs allow; every job that waits says why (``pending_reason``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from workers.elastic import write_resize

from ..capacity import Capacity, Resources, demand, held, shortfall, worker_range, workers_that_fit
from ..jobs import transition
from ..models import Job, Sweep
from .each import each

log = logging.getLogger("nestor.scheduler")


def _demand_or_none(job: Job) -> Resources | None:
    try:
        return held(job)
    except (TypeError, ValueError, KeyError):
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


def handed_jobs(db: Session) -> list[Job]:
    """The jobs handed to Ray (queued and claimed, or running): what holds the cluster."""
    return list(
        db.scalars(
            select(Job).where(Job.status.in_(("queued", "running")), Job.submission_id.is_not(None))
        )
    )


def start_queued(
    db: Session, *, capacity: Capacity, launch: Callable[[Session, Job], bool]
) -> None:
    """Start queued jobs, highest priority first then oldest, while the cluster's free
    CPUs and GPUs (of its total ``capacity``) allow; ``launch(db, job)`` hands one to Ray,
    False if it was no longer ours to start. A job that fits the cluster but not its free
    resources holds back the jobs after it (no starvation of big jobs); one that cannot fit
    the cluster at all (it may grow) waits aside and the jobs after it still start. Every
    waiting job says why in ``pending_reason``."""
    queue = _Queue(free=capacity.total)
    for j in handed_jobs(db):
        queue.take(j, _demand_or_none(j))
    queue.limits = {
        sweep.id: sweep.spec.get("max_concurrent", 1)
        for sweep in db.scalars(select(Sweep).where(Sweep.status == "running"))
    }
    queued = db.scalars(
        select(Job)
        .where(Job.status == "queued", Job.submission_id.is_(None))
        .order_by(Job.priority.desc(), Job.id)
    ).all()

    def consider(job: Job) -> None:
        try:
            _consider(db, job, capacity, queue, launch)
        except Exception as e:
            db.rollback()
            _pending(db, job, f"cannot be scheduled ({type(e).__name__}: {e})")
            raise

    each(db, queued, "scheduling", consider)
    if queue.blocked is None:  # no job waits for what is free: elastic jobs may grow
        grow(db, queue)


def preempt(db: Session, job: Job, need: Resources, free: Resources) -> str | None:
    """Make room for ``job`` (waiting for ``need``, with ``free`` free now) by taking workers
    from running preemptible jobs of lower priority, the lowest first, then the newest:
    an elastic one shrinks to its min; a fixed one, or an elastic one whose min is not
    enough, is suspended (it checkpoints and returns to the queue). Nothing is asked unless
    it frees enough; what earlier passes asked and is under way counts. Returns who gives
    way ("job 7 (to 1), job 9 (suspended)"), or None."""
    victims = db.scalars(
        select(Job)
        .where(
            Job.status == "running",
            Job.submission_id.is_not(None),
            Job.priority < job.priority,
            Job.id != job.id,
        )
        .order_by(Job.priority, Job.id.desc())
    ).all()
    plan: list[tuple[Job, int]] = []  # (job, workers to ask of it: 0 suspends)
    coming, under_way = free, []
    for victim in victims:
        if not victim.spec.get("preemptible") or victim.run_dir is None:
            continue
        try:
            lo, hi = worker_range(victim.spec)
        except (TypeError, ValueError, KeyError):
            continue
        now = victim.workers or victim.target_workers or lo
        asked = victim.target_workers
        if asked is not None and asked < now:  # giving way already
            coming = coming + demand(victim.spec, now - asked)
            under_way.append(f"job {victim.id}")
            continue
        if coming.covers(need):
            break
        if hi > lo and now > lo:  # shrink to its min first
            plan.append((victim, lo))
            coming = coming + demand(victim.spec, now - lo)
            if coming.covers(need):
                break
            plan[-1] = (victim, 0)
            coming = coming + demand(victim.spec, lo)
        else:
            plan.append((victim, 0))
            coming = coming + demand(victim.spec, now)
    if not coming.covers(need) or not (plan or under_way):
        return None
    words = list(under_way)
    for victim, workers in plan:
        ask_resize(db, victim, workers, f"preempted by job {job.id}")
        words.append(f"job {victim.id} ({'suspended' if workers == 0 else f'to {workers}'})")
    return ", ".join(words)


def grow(db: Session, queue: _Queue) -> None:
    """Running elastic jobs below their max take what is free, highest priority first,
    each asked (``resize.json``) to grow at its next step boundary."""
    running = db.scalars(
        select(Job)
        .where(Job.status == "running", Job.submission_id.is_not(None))
        .order_by(Job.priority.desc(), Job.id)
    ).all()
    for job in running:
        try:
            lo, hi = worker_range(job.spec)
        except (TypeError, ValueError, KeyError):
            continue
        now = job.workers or 0
        if hi == lo or job.workers_pinned or not now or now >= hi or job.run_dir is None:
            continue
        if job.target_workers not in (None, now):  # a resize asked for is under way
            continue
        extra = min(hi - now, workers_that_fit(job.spec, queue.free))
        if extra <= 0:
            continue
        ask_resize(db, job, now + extra, "capacity freed")
        queue.free = queue.free - demand(job.spec, extra)


def ask_resize(db: Session, job: Job, workers: int, reason: str, pin: bool = False) -> None:
    """Ask a running elastic job to train on ``workers`` from its next step boundary
    (``pin``: a resize by hand, which the scheduler then leaves alone)."""
    write_resize(Path(job.run_dir), workers, reason)
    values: dict = {"target_workers": workers}
    if pin:
        values["workers_pinned"] = True
    db.execute(update(Job).where(Job.id == job.id).values(**values))
    db.commit()
    log.info("job %s asked to train on %d workers (%s)", job.id, workers, reason)


def _consider(
    db: Session,
    job: Job,
    capacity: Capacity,
    queue: _Queue,
    launch: Callable[[Session, Job], bool],
) -> None:
    """Start ``job`` if it may start now, else record why it waits."""
    if job.cancel_requested:
        transition(db, job, "cancelled", "cancelled by user", unclaimed=True)
        return
    need = demand(job.spec)
    never = shortfall(need, capacity.total)
    if never is not None:
        _pending(db, job, f"{never}; waiting for the cluster to grow")
        return
    if queue.blocked is not None:
        _pending(db, job, queue.blocked)
        return
    sweep = job.sweep_id
    if sweep is not None and queue.active.get(sweep, 0) >= queue.limits.get(sweep, 1):
        _pending(db, job, f"its sweep runs {queue.limits.get(sweep, 1)} trials at a time")
        return  # other jobs may go ahead
    short = shortfall(need, queue.free, free=True)
    if short is not None:
        taken = preempt(db, job, need, queue.free)
        if taken:
            short += f"; taking workers from {taken}"
        _pending(db, job, short)
        queue.blocked = f"behind job {job.id} (priority {job.priority}), which waits for resources"
        return
    lo, hi = worker_range(job.spec)
    if hi > lo:  # elastic: as many as fit now, from its min up to its max
        size = min(hi, workers_that_fit(job.spec, queue.free))
        db.execute(update(Job).where(Job.id == job.id).values(target_workers=size, workers=None))
        db.commit()
        need = demand(job.spec, size)
    try:
        launched = launch(db, job)
    except Exception as e:
        log.exception("launching job %s failed", job.id)
        db.rollback()
        _pending(db, job, f"could not start on Ray ({type(e).__name__}: {e})")
        return
    if launched:
        queue.take(job, need)


def _pending(db: Session, job: Job, reason: str) -> None:
    if job.pending_reason != reason:
        db.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued")
            .values(pending_reason=reason[:500])
        )
        db.commit()
