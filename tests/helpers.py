"""Helpers the test modules share, one definition each: free loopback ports, JSON-lines
files, a worker token for a job (what a job's workers hold to ingest) and ingesting with
one, a scheduler over a fresh database, and launches recorded instead of sent to Ray."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def worker_token(app: Any, job_id: int) -> str:
    """A worker token of job ``job_id`` (as the scheduler makes at launch), straight from
    the app's database: the caller then ingests with it as the job's workers do."""
    from service.auth import create_token

    with app.state.db.sessions() as db:
        return create_token(db, "w", "worker", job_id=job_id)


def ingest(client: Any, job_id: int, body: dict[str, Any], token: str | None = None) -> Any:
    """POST ``body`` to the job's ingest endpoint as its workers do, with ``token`` or a new
    worker token of the job; returns the response."""
    token = token or worker_token(client.app, job_id)
    return client.post(
        f"/v1/jobs/{job_id}/ingest", json=body, headers={"Authorization": f"Bearer {token}"}
    )


def scheduler_for(home: Path, cluster: Any = None, cpus: int = 4, **settings: Any):
    """A scheduler over a fresh SQLite database in ``home``; by default over a local
    cluster of ``cpus`` CPUs that is never started. Returns (scheduler, database)."""
    from service.db import Database, upgrade
    from service.ray_cluster import RayCluster
    from service.scheduler import Scheduler
    from service.settings import Settings

    home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home / 'n.db'}"
    upgrade(url)
    db = Database(url)
    cluster = cluster or RayCluster(None, home, num_cpus=cpus)
    return Scheduler(Settings(home=home, **settings), db, cluster), db


def record_launches(key: str = "id") -> tuple[list[Any], Callable[[Any, Any], bool]]:
    """A hand-over to Ray for the queue phase (its ``launch``) that only claims the job and
    records its ``key`` (id or name). Returns (the list of those recorded, the hand-over)."""
    launched: list[Any] = []

    def launch(session, job) -> bool:
        launched.append(getattr(job, key))
        job.submission_id = f"test-{job.id}"
        session.commit()
        return True

    return launched, launch
