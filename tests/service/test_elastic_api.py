"""Elastic jobs and preemption in the API and the scheduler, without Ray: what a range is
refused for, PATCH's answers, a sweep's trials preemptible by default, and which running jobs
the queue takes workers from (the requests it writes into their run directories)."""

from __future__ import annotations

from service.capacity import Capacity, Resources, refusal
from service.jobs import create_job
from service.models import Job
from service.scheduler.queue import start_queued
from workers.elastic import read_resize

from ..helpers import ingest, record_launches, scheduler_for
from .test_api import SPEC
from .test_sweeps import GRID

ELASTIC = {**SPEC, "num_workers": {"min": 1, "max": 3}}


def test_a_range_is_stored_as_given_and_refused_only_when_its_min_cannot_fit():
    fixed = Capacity(Resources(cpus=2), fixed=True)
    assert refusal({**SPEC, "num_workers": {"min": 1, "max": 8}}, fixed) is None
    field, message = refusal({**SPEC, "num_workers": {"min": 3, "max": 8}}, fixed)
    assert field == "num_workers.min"
    assert (
        message
        == "num_workers.min=3: needs 3 CPUs, the cluster has 2 CPUs; this cluster cannot grow"
    )


def test_patch_says_why_it_cannot_resize(client):
    job = client.post("/v1/jobs", json={"name": "e", "spec": ELASTIC}).json()
    assert job["spec"]["num_workers"] == {"min": 1, "max": 3}
    fixed = client.post("/v1/jobs", json={"name": "f", "spec": SPEC}).json()

    r = client.patch(f"/v1/jobs/{fixed['id']}", json={"num_workers": 2})
    assert r.status_code == 422 and "has a fixed size" in r.json()["detail"]
    r = client.patch(f"/v1/jobs/{job['id']}", json={"num_workers": 4})
    assert r.status_code == 422
    assert r.json()["detail"] == f"num_workers=4: outside job {job['id']}'s range, 1 to 3"
    r = client.patch(f"/v1/jobs/{job['id']}", json={"num_workers": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "num_workers"]
    r = client.patch(f"/v1/jobs/{job['id']}", json={"num_workers": 2})  # still queued
    assert r.status_code == 409 and "only a running job resizes" in r.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # unchanged


def test_a_running_elastic_job_reports_its_size_and_each_change_is_an_event(client, tmp_path):
    job = client.post("/v1/jobs", json={"name": "e", "spec": ELASTIC}).json()
    with client.app.state.db.sessions() as db:
        db.get(Job, job["id"]).run_dir = str(tmp_path)
        db.commit()
    running = {"status": "running", "world_size": 2, "world_reason": "started on 2"}
    assert ingest(client, job["id"], running).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}").json()["workers"] == 2
    r = client.patch(f"/v1/jobs/{job['id']}", json={"num_workers": 3})
    assert r.status_code == 200, r.text
    asked = read_resize(tmp_path)
    assert (asked.num_workers, asked.reason) == (3, "resized by admin")
    grown = {"status": "running", "world_size": 3, "world_reason": "resized by admin"}
    assert ingest(client, job["id"], grown).status_code == 200
    events = client.get(f"/v1/jobs/{job['id']}/events/history").json()
    assert [(e["status"], e["reason"]) for e in events][-1] == (
        "resized",
        "2 -> 3 workers: resized by admin",
    )


def test_a_sweeps_trials_are_preemptible_unless_their_spec_says_otherwise(client):
    sweep = client.post("/v1/sweeps", json=GRID).json()
    trials = client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"]
    assert trials and all(t["spec"]["preemptible"] is True for t in trials)
    kept = {**GRID, "base": {**GRID["base"], "preemptible": False}}
    sweep = client.post("/v1/sweeps", json=kept).json()
    trials = client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"]
    assert all(t["spec"]["preemptible"] is False for t in trials)


def running_job(s, name, spec, priority, workers, run_dir):
    job = create_job(s, name, spec, priority)
    job.status, job.submission_id, job.run_dir = "running", f"test-{name}", str(run_dir)
    job.workers = job.target_workers = workers
    s.commit()
    return job


def test_the_queue_takes_workers_from_lower_priority_preemptible_jobs_only(tmp_path):
    """4 CPUs, all held: an elastic preemptible job on 2 (min 1), a fixed preemptible one
    on 1, a fixed job that is not preemptible on 1. A priority-5 job needing 3 CPUs: the
    newest preemptible job is suspended first (1 CPU), then the elastic one shrinks to its
    min (1 more); 2 are not 3, so the elastic one is suspended whole. The one that is not
    preemptible keeps its worker."""
    scheduler, db = scheduler_for(tmp_path, cpus=4)
    launched, record = record_launches(key="name")
    runs = {n: tmp_path / n for n in ("elastic", "fixed", "kept")}
    for path in runs.values():
        path.mkdir()
    one = {**SPEC, "num_workers": 1, "batch_size": 256, "micro_batch_size": 256}
    with db.sessions() as s:
        elastic = {**ELASTIC, "preemptible": True}
        running_job(s, "elastic", elastic, 0, 2, runs["elastic"])
        running_job(s, "fixed", {**one, "preemptible": True}, 0, None, runs["fixed"])
        running_job(s, "kept", one, 0, None, runs["kept"])
        three = {**SPEC, "num_workers": 3, "batch_size": 384, "micro_batch_size": 128}
        urgent = create_job(s, "urgent", three, 5)
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert launched == []
        s.refresh(urgent)
        assert urgent.pending_reason == (
            "needs 3 CPUs, 0 free; taking workers from job 2 (suspended), job 1 (suspended)"
        )
    assert read_resize(runs["fixed"]).num_workers == 0
    assert read_resize(runs["elastic"]).num_workers == 0
    assert read_resize(runs["elastic"]).reason == f"preempted by job {urgent.id}"
    assert read_resize(runs["kept"]) is None
    # The next pass asks nothing more: what was asked is under way.
    with db.sessions() as s:
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert "taking workers from job 2, job 1" in s.get(Job, urgent.id).pending_reason
