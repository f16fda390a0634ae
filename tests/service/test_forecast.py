"""The queue's estimates (service/forecast.py): when queued jobs start and running jobs end,
replayed by the scheduler's rules from the running jobs' rates."""

from __future__ import annotations

import math
import time
from datetime import datetime

import pytest

from service.capacity import Resources
from service.forecast import Queued, Running, forecast, steps_per_second

from ..helpers import ingest, scheduler_for
from .test_api import SPEC


def cpus(n: float) -> Resources:
    return Resources(cpus=n)


def test_rate_is_steps_over_the_seconds_between_the_newest_and_oldest_points():
    points = [(40, 120.0), (30, 115.0), (20, 110.0)]  # newest first, as the API reads them
    assert steps_per_second(points) == pytest.approx(2.0)
    assert steps_per_second([(5, 1.0)]) is None
    assert steps_per_second([(5, 1.0), (6, 1.0)]) is None  # no time between them


def test_a_queued_job_starts_when_the_running_job_it_waits_for_ends():
    plans = forecast(
        cpus(4),
        [Running(1, cpus(4), remaining_steps=100, steps_per_second=2.0)],
        [Queued(2, cpus(2), max_steps=50)],
    )
    assert plans[1].end_in == pytest.approx(50.0) and plans[1].position is None
    assert plans[2].position == 1 and plans[2].start_in == pytest.approx(50.0)


def test_jobs_start_in_queue_order_and_a_waiting_job_holds_back_those_behind_it():
    """Of 4 CPUs, 2 free at 10 s, 2 more at 30 s. The head needs 3: it starts at 30 s. The
    next needs 1, free from 10 s, but waits behind the head, as the scheduler makes it."""
    plans = forecast(
        cpus(4),
        [
            Running(1, cpus(2), remaining_steps=10, steps_per_second=1.0),
            Running(2, cpus(2), remaining_steps=60, steps_per_second=2.0),
        ],
        [Queued(3, cpus(3), max_steps=10), Queued(4, cpus(1), max_steps=10)],
    )
    assert (plans[3].position, plans[3].start_in) == (1, pytest.approx(30.0))
    assert (plans[4].position, plans[4].start_in) == (2, pytest.approx(30.0))


def test_a_job_that_fits_now_starts_now():
    plans = forecast(cpus(4), [Running(1, cpus(1), 10, 1.0)], [Queued(2, cpus(2), 10)])
    assert plans[2].start_in == 0.0


def test_what_cannot_be_known_is_none_and_a_job_that_never_fits_blocks_nobody():
    plans = forecast(
        cpus(2),
        [Running(1, cpus(2), remaining_steps=100, steps_per_second=None)],  # no rate yet
        [Queued(2, cpus(8), max_steps=10), Queued(3, cpus(1), max_steps=10)],
    )
    assert plans[1].end_in is None
    assert plans[2].position == 1 and plans[2].start_in is None  # can never fit
    assert plans[3].position == 2 and plans[3].start_in is None  # waits for job 1's end


def test_a_job_behind_one_whose_length_is_unknown_has_no_estimate():
    """Job 2 starts when job 1 ends; how long job 2 runs is not known until it runs, so job 3,
    which needs job 2's CPUs, has no estimate."""
    plans = forecast(
        cpus(2),
        [Running(1, cpus(2), remaining_steps=20, steps_per_second=2.0)],
        [Queued(2, cpus(2), max_steps=10), Queued(3, cpus(2), max_steps=10)],
    )
    assert plans[2].start_in == pytest.approx(10.0)
    assert plans[3].start_in is None


def test_without_the_clusters_size_only_positions_are_given():
    plans = forecast(None, [Running(1, cpus(1), 5, 1.0)], [Queued(2, cpus(1), 10)])
    assert plans[2].position == 1 and plans[2].start_in is None
    assert plans[1].end_in == pytest.approx(5.0)


def test_a_sweeps_trial_has_a_place_but_its_sweep_decides_when_it_runs():
    plans = forecast(cpus(4), [], [Queued(2, cpus(1), 10, in_sweep=True), Queued(3, cpus(1), 10)])
    assert plans[2].position == 1 and plans[2].start_in is None
    assert plans[3].position == 2 and plans[3].start_in == 0.0
    assert not any(math.isinf(p.start_in or 0) for p in plans.values())


def test_the_api_shows_each_jobs_place_rate_and_estimates(client, tmp_path):
    """Through GET /v1/jobs and /v1/jobs/{id}: a running job's progress, rate and end; the
    queued jobs' places (priority first) and starts, on a 2-CPU cluster."""
    client.app.state.scheduler = scheduler_for(tmp_path / "cluster", cpus=2)[0]

    def submit(name: str, workers: int, priority: int) -> int:
        spec = {**SPEC, "num_workers": workers, "max_steps": 100}
        body = {"name": name, "spec": spec, "priority": priority}
        return client.post("/v1/jobs", json=body).json()["id"]

    running = submit("running", 2, 0)
    now = time.time()
    points = [
        {"step": s, "time": now - (20 - s) * 0.5, "values": {"train_loss": 1.0}}
        for s in range(1, 21)
    ]
    assert ingest(client, running, {"points": points, "status": "running"}).status_code == 200
    low = submit("low", 1, 0)
    high = submit("high", 2, 5)

    jobs = {j["id"]: j for j in client.get("/v1/jobs").json()["data"]}
    job = jobs[running]
    assert job["status"] == "running" and job["queue_position"] is None
    assert job["progress"] == pytest.approx(0.2)
    assert job["steps_per_second"] == pytest.approx(2.0)
    seconds = datetime.fromisoformat(job["estimated_end"]).timestamp() - time.time()
    assert 35 < seconds <= 40  # 80 steps left at 2 a second
    assert jobs[high]["queue_position"] == 1 and jobs[low]["queue_position"] == 2
    start = datetime.fromisoformat(jobs[high]["estimated_start"]).timestamp()
    assert start == pytest.approx(datetime.fromisoformat(job["estimated_end"]).timestamp(), abs=1)
    assert jobs[low]["estimated_start"] is None  # behind a job whose length is not known
    assert jobs[high]["estimated_end"] is None and jobs[high]["progress"] == 0.0

    one = client.get(f"/v1/jobs/{high}").json()
    assert one["queue_position"] == 1
    again = datetime.fromisoformat(one["estimated_start"]).timestamp()
    assert again == pytest.approx(start, abs=2)  # read a moment later, from the same rate
    # Ended jobs carry none of it.
    assert client.post(f"/v1/jobs/{low}/cancel").status_code == 200
    ended = client.get(f"/v1/jobs/{low}").json()
    assert ended["queue_position"] is None and ended["progress"] is None


def test_nestor_jobs_says_where_each_job_stands():
    from datetime import UTC, timedelta

    from service.cli.api import job_timing

    now = datetime(2026, 1, 1, tzinfo=UTC)
    queued = {
        "status": "queued",
        "queue_position": 2,
        "estimated_start": (now + timedelta(seconds=40)).isoformat(),
        "pending_reason": "behind job 12 (priority 5), which waits for resources",
    }
    assert job_timing(queued, now) == (
        "waiting: #2 in the queue; starts in ~40 s; "
        "behind job 12 (priority 5), which waits for resources"
    )
    unknown = {**queued, "estimated_start": None, "pending_reason": "needs 4 CPUs, 2 free"}
    assert job_timing(unknown, now) == (
        "waiting: #2 in the queue; start not known yet; needs 4 CPUs, 2 free"
    )
    running = {
        "status": "running",
        "steps_per_second": 2.5,
        "estimated_end": (now + timedelta(minutes=12)).isoformat(),
    }
    assert job_timing(running, now) == "running: 2.5 steps/s, ends in ~12 min"
    assert job_timing({**running, "steps_per_second": None}, now) == "running: no rate yet"
    assert job_timing({**running, "workers": 1}, now) == (
        "running on 1 worker: 2.5 steps/s, ends in ~12 min"
    )
    assert job_timing({**running, "workers": 3}, now).startswith("running on 3 workers: ")
    assert job_timing({"status": "succeeded"}, now) is None
