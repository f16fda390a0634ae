"""The end-of-job backfill: points in a run's ``metrics.jsonl`` that the live path never
delivered (the service was down when the job ended, say). Only steps after the job's last
stored step are read, and they are stored in short transactions, so a long job never holds
SQLite's write lock for seconds; a torn or unreadable line is skipped with a warning."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from .db import serial_writes
from .jobs import store_points
from .models import Job

log = logging.getLogger("nestor.backfill")
ROWS_PER_TRANSACTION = 2000


def records_after(path: Path, step: int) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``path`` whose step is after ``step``, in file order."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                rec_step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s: skipping unreadable line %d (torn by a crash?)", path, lineno)
                continue
            if rec_step > step:
                yield rec


def backfill(sessions: Callable[[], Session], job_id: int, path: Path) -> int:
    """Store the points of ``path`` after the job's last stored step; the rows stored."""
    if not path.exists():
        return 0
    with sessions() as db:
        job = db.get(Job, job_id)
        after = job.last_step if job is not None else 0
    stored, rows = 0, []
    for rec in records_after(path, after):
        for key, value in rec.items():
            if key not in ("step", "time"):
                rows.append((rec["step"], key, value, rec.get("time", 0.0)))
        if len(rows) >= ROWS_PER_TRANSACTION:
            stored += _store(sessions, job_id, rows)
            rows = []
    if rows:
        stored += _store(sessions, job_id, rows)
    if stored:
        log.info("job %s: backfilled %d points after step %d from %s", job_id, stored, after, path)
    return stored


def _store(sessions: Callable[[], Session], job_id: int, rows: list[tuple]) -> int:
    with sessions() as db:
        job = db.get(Job, job_id, with_for_update=True)  # ingest's order (see jobs.ingest)
        if job is None:
            return 0
        with serial_writes(db):
            store_points(db, job_id, rows)
            db.commit()
    return len(rows)
