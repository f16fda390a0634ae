"""One job's error never stops the others."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from sqlalchemy.orm import Session

from ..models import Job

log = logging.getLogger("nestor.scheduler")


def each(db: Session, jobs: Iterable[Job], what: str, fn: Callable[[Job], None]) -> None:
    """``fn(job)`` for every job, an error with one logged and rolled back, never fatal."""
    for job in jobs:
        try:
            fn(job)
        except Exception:
            log.exception("%s job %s failed; going on with the others", what, job.id)
            db.rollback()
