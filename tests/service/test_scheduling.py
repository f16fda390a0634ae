"""Queue order and capacity (the Ray submission itself is exercised in test_lifecycle), and
the live event stream."""

from __future__ import annotations

import json
from pathlib import Path

from service.auth import create_token
from service.db import Database, upgrade
from service.jobs import create_job
from service.models import Job
from service.ray_cluster import RayCluster
from service.scheduler import Scheduler
from service.settings import Settings

from .test_api import SPEC


def test_queue_starts_jobs_by_priority_then_fifo_within_capacity(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    db = Database(url)
    # A local cluster description with 4 CPUs; not started: launching is recorded instead.
    scheduler = Scheduler(Settings(home=tmp_path), db, RayCluster(None, tmp_path, num_cpus=4))
    launched: list[str] = []

    def launch(session, job):
        launched.append(job.name)
        job.submission_id = f"test-{job.id}"
        session.commit()

    scheduler.launch = launch
    with db.sessions() as s:
        create_job(s, "low-a", {**SPEC, "num_workers": 1}, 0)
        create_job(s, "high", {**SPEC, "num_workers": 2}, 10)
        create_job(s, "low-b", {**SPEC, "num_workers": 1}, 0)
        create_job(s, "big", {**SPEC, "num_workers": 2}, 0)
        scheduler.start_queued(s)
        # 4 CPUs: high (2), then low-a (1), low-b (1); big waits for capacity.
        assert launched == ["high", "low-a", "low-b"]
        scheduler.start_queued(s)
        assert launched == ["high", "low-a", "low-b"]
        done = s.query(Job).filter(Job.name == "high").one()
        done.status = "succeeded"
        s.commit()
        scheduler.start_queued(s)
        assert launched == ["high", "low-a", "low-b", "big"]


def test_event_stream_sends_status_and_metrics_then_ends(client):
    job = client.post("/v1/jobs", json={"name": "sse", "spec": SPEC}).json()
    with client.app.state.db.sessions() as db:
        worker = create_token(db, "w", "worker", job_id=job["id"])
    headers = {"Authorization": f"Bearer {worker}"}
    points = [{"step": s, "values": {"train_loss": 1.0 / s}} for s in (1, 2, 3)]
    client.post(
        f"/v1/jobs/{job['id']}/ingest",
        json={"points": points, "status": "running"},
        headers=headers,
    )
    client.post(f"/v1/jobs/{job['id']}/ingest", json={"status": "succeeded"}, headers=headers)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = "".join(resp.iter_text())
    events = [block.split("\n") for block in body.strip().split("\n\n")]
    kinds = [lines[0].removeprefix("event: ") for lines in events]
    assert kinds[:3] == ["status", "status", "status"] and kinds[-1] == "end"
    statuses = [
        json.loads(lines[-1].removeprefix("data: "))["status"]
        for lines in events
        if lines[0] == "event: status"
    ]
    assert statuses == ["queued", "running", "succeeded"]
    metrics = [
        json.loads(lines[-1].removeprefix("data: "))
        for lines in events
        if lines[0] == "event: metrics"
    ]
    assert [p["step"] for p in metrics[0]] == [1, 2, 3]


def test_admin_token_file_is_created_once_with_private_mode(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path}/n.db")
    with TestClient(create_app(settings, scheduler=False)) as c:
        path = Path(c.app.state.admin_token_file)
        token = path.read_text().strip()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with TestClient(create_app(settings, scheduler=False)) as c:  # a restart keeps it
        assert path.read_text().strip() == token
        with c.app.state.db.sessions() as db:
            from sqlalchemy import select

            from service.models import ApiToken

            stored = db.scalars(select(ApiToken.token_hash)).all()
        assert token not in stored and len(stored) == 1  # only its digest is stored
