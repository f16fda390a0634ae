"""Queue order and capacity (the Ray submission itself is exercised in test_lifecycle), and
the live event stream."""

from __future__ import annotations

import json
from pathlib import Path

from service.jobs import create_job, transition
from service.models import Job
from service.ray_cluster import RayCluster
from service.ray_jobs import RayJobs
from service.scheduler.launch import launch
from service.scheduler.queue import start_queued
from service.scheduler.reconcile import finish, reconcile
from service.settings import Settings

from ..helpers import record_launches, scheduler_for, worker_token
from .test_api import SPEC


def test_queue_starts_jobs_by_priority_then_fifo_within_capacity(tmp_path):
    # A local cluster description with 4 CPUs; not started: launching is recorded instead.
    scheduler, db = scheduler_for(tmp_path, cpus=4)
    launched, record = record_launches(key="name")
    with db.sessions() as s:
        create_job(s, "low-a", {**SPEC, "num_workers": 1}, 0)
        create_job(s, "high", {**SPEC, "num_workers": 2}, 10)
        create_job(s, "low-b", {**SPEC, "num_workers": 1}, 0)
        create_job(s, "big", {**SPEC, "num_workers": 2}, 0)
        start_queued(s, capacity=scheduler.capacity, launch=record)
        # 4 CPUs: high (2), then low-a (1), low-b (1); big waits for capacity.
        assert launched == ["high", "low-a", "low-b"]
        big = s.query(Job).filter(Job.name == "big").one()
        assert big.pending_reason == "needs 2 CPUs, 0 free"
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert launched == ["high", "low-a", "low-b"]
        done = s.query(Job).filter(Job.name == "high").one()
        done.status = "succeeded"
        s.commit()
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert launched == ["high", "low-a", "low-b", "big"]


def test_event_stream_sends_status_and_metrics_then_ends(client):
    job = client.post("/v1/jobs", json={"name": "sse", "spec": SPEC}).json()
    worker = worker_token(client.app, job["id"])
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


# ------------------------------------------------------------------ hardening the queue
def test_on_a_cluster_that_may_grow_a_job_too_big_waits_aside_and_the_rest_start(
    ray_cluster, tmp_path
):
    """An external cluster (here the session's two real nodes, 4 CPUs, no GPU, reached by
    its dashboard address) may grow: a job it cannot hold now waits with a reason, and the
    jobs behind it that fit still start. GPUs are counted."""
    cluster = RayCluster(ray_cluster.dashboard_url, tmp_path)
    scheduler, db = scheduler_for(tmp_path, cluster)
    assert scheduler.capacity.total.cpus == 4 and scheduler.capacity.total.gpus == 0
    assert not scheduler.capacity.fixed
    launched, record = record_launches(key="name")
    with db.sessions() as s:
        create_job(s, "huge", {**SPEC, "num_workers": 8}, 10)
        create_job(s, "gpu", {**SPEC, "use_gpu": True}, 5)
        create_job(s, "small", {**SPEC, "num_workers": 2}, 0)
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert launched == ["small"]
        reasons = {j.name: j.pending_reason for j in s.query(Job)}
    assert (
        reasons["huge"] == "needs 8 CPUs, the cluster has 4 CPUs; waiting for the cluster to grow"
    )
    assert reasons["gpu"] == (
        "needs 1 GPU (use_gpu), the cluster has none; waiting for the cluster to grow"
    )
    assert reasons["small"] is None


def test_one_unreadable_job_never_stops_the_queue(tmp_path):
    scheduler, db = scheduler_for(tmp_path, cpus=4)
    launched, record = record_launches(key="name")
    with db.sessions() as s:
        bad = create_job(s, "bad", {**SPEC, "num_workers": "two"}, 10)  # a hand-edited row
        create_job(s, "good", SPEC, 0)
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert launched == ["good"]
        s.refresh(bad)
        assert bad.status == "queued" and "cannot be scheduled (ValueError" in bad.pending_reason


def test_backfill_skips_torn_lines_and_reads_only_after_the_last_stored_step(tmp_path):
    from sqlalchemy import event, select

    from service.backfill import ROWS_PER_TRANSACTION
    from service.jobs import store_points
    from service.models import Metric

    _, db = scheduler_for(tmp_path, cpus=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        json.dumps({"step": s, "time": 1.0, "train_loss": s, "lr": 0.1}) for s in range(1, 6001)
    ]
    lines[4500] = lines[4500][:17]  # a line torn by a crash, then the run went on
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6001, "tra')
    with db.sessions() as s:
        job = create_job(s, "long", SPEC, 0)
        job.run_dir, job.submission_id = str(run_dir), "test-long"
        transition(s, job, "running", "test")
        store_points(s, job.id, [(st, "train_loss", -1.0, 0.0) for st in range(1, 4001)])
        s.commit()
        commits = []
        event.listen(db.engine, "commit", lambda conn: commits.append(1))
        finish(s, job, "succeeded", "training finished", backfill_with=db.sessions)
        assert job.status == "succeeded" and job.last_step == 6000
        values = dict(
            s.execute(
                select(Metric.step, Metric.value).where(
                    Metric.job_id == job.id, Metric.key == "train_loss"
                )
            ).all()
        )
    assert values[4000] == -1.0  # stored before: not read again from the file
    assert values[4001] == 4001.0 and values[6000] == 6000.0
    assert 4501 not in values  # the torn line
    assert len(values) == 5999
    rows_after = (6000 - 4000 - 1) * 2
    assert len(commits) >= rows_after // ROWS_PER_TRANSACTION  # short transactions


def test_a_run_directory_belongs_to_one_job_row(tmp_path):
    """Job ids repeat after a database reset: the second database's job 1 must not resume
    from the first one's checkpoints (or inherit its metrics)."""
    from service.scheduler import submission_id

    runs = tmp_path / "runs"
    cluster = RayCluster(None, tmp_path, num_cpus=4)
    _, db_a = scheduler_for(tmp_path / "a", cluster, runs_dir=runs)
    second, db_b = scheduler_for(tmp_path / "b", cluster, runs_dir=runs)
    with db_a.sessions() as a, db_b.sessions() as b:
        job_a, job_b = create_job(a, "a", SPEC, 0), create_job(b, "b", SPEC, 0)
        assert job_a.id == job_b.id == 1
        assert submission_id(job_a) != submission_id(job_b)
        # A run of job A's is where job B's directory would be (shared storage, same name).
        taken = runs / submission_id(job_b)
        (taken / "checkpoints" / "step-00000008").mkdir(parents=True)
        (taken / "nestor-job.json").write_text(json.dumps({"job_id": 1, "submission_id": "x"}))
        assert (
            launch(b, job_b, ray=second.ray, storage=second.storage, settings=second.settings)
            is False
        )
        assert job_b.status == "failed"
        assert "belongs to another run (job 1 (x)); refusing to start in it" in job_b.error
        assert job_b.submission_id is None


def _ray_scheduler(tmp_path, ray_cluster):
    """A scheduler on the session's real cluster, driven pass by pass by the test."""
    from service.ray_jobs import RayJobs

    scheduler, db = scheduler_for(tmp_path, ray_cluster)
    scheduler.ray = RayJobs(ray_cluster.dashboard_url)
    return scheduler, db


def test_a_cancel_while_the_scheduler_hands_a_job_to_ray_stops_the_ray_job(ray_cluster, tmp_path):
    """The user's cancel lands between the scheduler reading the queue and Ray accepting
    the job: the row must not end cancelled over a Ray job that keeps running."""
    from service.jobs import cancel_job
    from service.scheduler import submission_id

    from .live import wait_for

    scheduler, db = _ray_scheduler(tmp_path, ray_cluster)
    with db.sessions() as s:
        job = create_job(s, "raced", {**SPEC, "max_steps": 100_000}, 0)
    sid = None
    submit = scheduler.ray.submit

    def submit_while_the_user_cancels(sub_id, entrypoint, env):
        nonlocal sid
        sid = sub_id
        with db.sessions() as api:  # the API's request, in its own session
            assert cancel_job(api, api.get(Job, job.id), "cancelled by user")
        return submit(sub_id, entrypoint, env)

    scheduler.ray.submit = submit_while_the_user_cancels
    scheduler.run_once()  # the queue hands the job to Ray

    def ended():
        scheduler.run_once()  # reconcile brings the row in line with Ray
        with db.sessions() as s:
            return s.get(Job, job.id).status in ("cancelled", "failed", "succeeded")

    wait_for(ended, timeout=120)
    with db.sessions() as s:
        row = s.get(Job, job.id)
        assert row.status == "cancelled" and sid == submission_id(row)
    assert scheduler.ray.get(sid).status == "STOPPED"


def test_a_job_cancelled_before_the_claim_is_never_handed_to_ray(ray_cluster, tmp_path):
    from service.jobs import cancel_job
    from service.scheduler import submission_id

    scheduler, db = _ray_scheduler(tmp_path, ray_cluster)
    with db.sessions() as s:
        job = create_job(s, "raced", SPEC, 0)

    def cancelled_just_before(session, queued):
        with db.sessions() as api:
            assert cancel_job(api, api.get(Job, queued.id), "cancelled by user")
        return launch(
            session,
            queued,
            ray=scheduler.ray,
            storage=scheduler.storage,
            settings=scheduler.settings,
        )

    with db.sessions() as s:
        start_queued(s, capacity=scheduler.capacity, launch=cancelled_just_before)
        row = s.get(Job, job.id)
        s.refresh(row)
        assert row.status == "cancelled" and row.submission_id is None
        assert scheduler.ray.get(submission_id(row)) is None  # nothing reached Ray


def test_a_job_ray_lost_is_requeued_and_its_lost_attempts_workers_are_shut_out(tmp_path):
    """Ray has no record of a running job (its cluster was replaced): the job goes back to
    the queue to resume from its checkpoint, and the lost attempt's worker token stops
    working, so a straggler of that attempt cannot write into the next one. Ray's answer
    ("no such job") is the one thing stubbed: the real one needs the cluster replaced."""
    from service.auth import create_token, lookup

    scheduler, db = scheduler_for(tmp_path, cpus=4)
    scheduler.ray = RayJobs("http://127.0.0.1:1")  # never started: only get() is called
    scheduler.ray.get = lambda submission_id: None
    with db.sessions() as s:
        job = create_job(s, "lost", {**SPEC, "num_workers": 1}, 0)
        job.status, job.submission_id = "running", "nestor-lost-1"
        s.commit()
        token = create_token(s, "w", "worker", job_id=job.id)
        assert lookup(s, token) is not None
        reconcile(s, ray=scheduler.ray, storage=scheduler.storage, backfill_with=db.sessions)
        s.refresh(job)
        assert (job.status, job.submission_id) == ("queued", None)
        assert lookup(s, token) is None
