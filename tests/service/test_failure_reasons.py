"""A job whose worker or driver is killed ends `failed` with an error that says so first:
which process (the rank, the driver) and by what (here SIGKILL; Ray's memory monitor's and
the kernel's words are read in tests/workers/test_deaths.py), the same in the job's failure
event and `nestor show`. The whole service on the session's real Ray, no restarts left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from workers.logs import JobLog
from workers.run_dir import RunDir

from ..helpers import read_jsonl
from .conftest import ADMIN
from .live import TINY, run_dir, wait_for

SIGKILL = "killed by signal 9 (SIGKILL: the kernel's OOM killer or someone's kill -9)"
ENDLESS = {**TINY, "max_steps": 100_000, "max_restarts": 0}


def training(live, job_id: int, rank: int = 1, starts: int = 1) -> dict[int, int] | None:
    """Each rank's latest pid once ``rank`` has started ``starts`` times and the job has
    reported a step since (its group is up and training); None before."""
    try:
        directory = run_dir(live, job_id)
        workers = read_jsonl(RunDir(directory).workers)
        metrics = read_jsonl(RunDir(directory).metrics)
    except (AssertionError, OSError, ValueError):  # no run directory yet, a torn line
        return None
    mine = [w for w in workers if w["rank"] == rank]
    if len(mine) < starts or not metrics or metrics[-1]["time"] <= mine[-1]["time"]:
        return None
    return {w["rank"]: w["pid"] for w in workers}


def shown(live, job_id: int) -> dict:
    """`nestor show ID`'s JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "show", str(job_id)],
        env={**os.environ, "NESTOR_URL": live.url, "NESTOR_TOKEN": ADMIN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_reported(live, client, job: dict, first_line: str) -> str:
    """The job failed with ``first_line`` first in its error, its failure event and `nestor
    show`; returns the error."""
    assert job["status"] == "failed", job
    error = job["error"]
    assert error.splitlines()[0] == first_line, error
    event = client.events(job["id"])[-1]
    assert (event["status"], event["reason"]) == ("failed", error)
    assert shown(live, job["id"])["error"] == error
    return error


def test_a_sigkilled_worker_ends_the_job_with_an_error_naming_its_rank(service):
    """On a warm group (the service's default for a CPU job): rank 1 is named, then its
    peer's broken collective, which is a consequence and no death."""
    live, client = service
    job = client.submit(ENDLESS, name="rank 1 killed")
    pids = wait_for(lambda: training(live, job["id"]), timeout=240, every=0.2)
    os.kill(pids[1], signal.SIGKILL)
    done = client.wait(job["id"], timeout=120, poll=0.5)
    error = assert_reported(live, client, done, f"worker rank 1 {SIGKILL}")
    assert "rank 0 killed" not in error  # its peer's error is a consequence, not a death


def test_a_sigkilled_ray_train_worker_with_no_restarts_left_is_named_too(service):
    """A kill on the warm group costs the one restart (the job goes on with Ray Train's
    group, from its checkpoint); a second kill, of Ray Train's rank 1, ends the job."""
    live, client = service
    job = client.submit({**ENDLESS, "max_restarts": 1}, name="rank 1 killed twice")
    pids = wait_for(lambda: training(live, job["id"]), timeout=240, every=0.2)
    os.kill(pids[1], signal.SIGKILL)
    pids = wait_for(lambda: training(live, job["id"], starts=2), timeout=240, every=0.2)
    os.kill(pids[1], signal.SIGKILL)
    done = client.wait(job["id"], timeout=120, poll=0.5)
    assert_reported(live, client, done, f"worker rank 1 {SIGKILL}")
    log = JobLog(RunDir(run_dir(live, job["id"])).logs).read(0, 100_000).lines
    assert any("warm worker group failed (WarmGroupError)" in line for line in log)


def driver_pid(job_id: int) -> int | None:
    """The job's driver: the process started as ``python -m workers.driver --job-id N``."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue
        if argv[1:5] == ["-m", "workers.driver", "--job-id", str(job_id)]:
            return int(proc.name)
    return None


def test_a_sigkilled_driver_ends_the_job_with_an_error_naming_it(service):
    """The driver leaves no result and a log that just stops: Ray's report of its exit
    names the signal, before the log's last lines."""
    live, client = service
    job = client.submit({**ENDLESS, "num_workers": 1}, name="driver killed")
    wait_for(lambda: training(live, job["id"], rank=0), timeout=240, every=0.2)
    os.kill(wait_for(lambda: driver_pid(job["id"]), timeout=30), signal.SIGKILL)
    done = client.wait(job["id"], timeout=120, poll=0.5)
    error = assert_reported(live, client, done, f"driver {SIGKILL}")
    assert "the job's log ends:" in error  # what it last wrote, after the line of its death
