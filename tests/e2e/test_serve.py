"""`nestor serve` as a user runs it: a real process on the embedded defaults (its own Ray,
SQLite in NESTOR_HOME), killed, stopped and started again mid-job; a second server on the
same database; `nestor stop`; `nestor train` after the service has gone.

The tests of this module run in order on one home and one embedded Ray cluster, as a user's
machine would see them one after another.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.client import Client

from ..helpers import free_port

ROOT = Path(__file__).parents[2]
ADMIN = "nst_e2e_admin_token"
JOB = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 2000},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 128,
    "num_workers": 2,
    "max_steps": 300,
    "eval_every": 50,
    "checkpoint_every": 100,
}


def gcs_servers() -> set[int]:
    """Pids of every Ray GCS server on this machine: one per Ray cluster."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gcs_server" in cmdline.split(b"\0")[0]:
                found.add(int(proc.name))
    return found


class Nestor:
    """The `nestor` command with this module's NESTOR_HOME; `serve` runs in the background."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.proc: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "NESTOR_HOME": str(home),
            "NESTOR_PORT": str(port),
            "NESTOR_ADMIN_TOKEN": ADMIN,
            "NESTOR_URL": f"http://127.0.0.1:{port}",
            "NESTOR_TOKEN": ADMIN,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.client = Client(f"http://127.0.0.1:{port}", ADMIN, timeout=10)

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env={**self.env, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def serve(self) -> None:
        log = open(self.home / "serve.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.home / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("nestor serve did not come up")

    def signal(self, sig: int, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def wait(self, job_id: int, timeout: float = 300) -> dict:
        return self.client.wait(job_id, timeout=timeout)

    def wait_running(self, job_id: int, step: int) -> None:
        deadline = time.time() + 180
        while self.client.job(job_id)["last_step"] < step:
            assert time.time() < deadline, self.client.job(job_id)
            time.sleep(0.3)

    def steps(self, job_id: int) -> list[int]:
        series = self.client.metrics(job_id, keys=["train_loss"], max_points=100_000)["series"]
        return series["train_loss"]["step"]


@pytest.fixture(scope="module")
def nestor(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    n = Nestor(home, free_port())
    before = gcs_servers()
    yield n
    if n.proc is not None and n.proc.poll() is None:
        n.proc.kill()
        n.proc.wait()
    n.run("stop", timeout=180)  # whatever a failed test left behind
    assert gcs_servers() <= before


def test_a_second_server_on_the_same_database_refuses_to_start(nestor):
    before = gcs_servers()
    nestor.serve()
    assert len(gcs_servers() - before) == 1  # its embedded Ray
    second = Nestor(nestor.home, free_port())
    result = second.run("serve", timeout=60)
    assert result.returncode == 2
    assert (
        f"another Nestor scheduler holds this database: pid {nestor.proc.pid}, "
        f"host {socket.gethostname()}" in result.stderr
    )
    assert len(gcs_servers() - before) == 1  # no second cluster was started
    # Another replica of the API on the same database, without a scheduler, is allowed.
    replica = Nestor(nestor.home, free_port())
    job = nestor.client.submit({**JOB, "max_steps": 5}, name="seen by both")
    replica.proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--api-only"],
        env=replica.env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert replica.client.job(job["id"])["name"] == "seen by both"
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.3)
        assert len(gcs_servers() - before) == 1
    finally:
        replica.proc.terminate()
        replica.proc.wait(timeout=60)
    assert nestor.wait(job["id"])["status"] == "succeeded"


def test_a_sigkilled_service_restarts_adopting_its_ray_and_the_job_loses_nothing(nestor):
    clusters = gcs_servers()
    job = nestor.client.submit(JOB, name="survives SIGKILL")
    nestor.wait_running(job["id"], 5)
    assert nestor.signal(signal.SIGKILL) == -signal.SIGKILL
    nestor.serve()  # the stale lease is gone with the process; the Ray it left is adopted
    assert gcs_servers() == clusters  # one embedded cluster, the same one
    done = nestor.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert nestor.steps(job["id"]) == list(range(1, JOB["max_steps"] + 1))
    assert "adopted the embedded Ray" in (nestor.home / "serve.log").read_text()


def test_a_gracefully_stopped_service_leaves_its_running_job_to_finish(nestor):
    """SIGTERM with a job running and a live viewer open: the service exits promptly, the
    job goes on on the embedded Ray, and the next start adopts both."""
    clusters = gcs_servers()
    job = nestor.client.submit(JOB, name="survives SIGTERM")
    nestor.wait_running(job["id"], 5)
    with (
        httpx.Client(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as http,
        http.stream("GET", f"http://127.0.0.1:{nestor.port}/v1/jobs/{job['id']}/events") as sse,
    ):
        assert sse.status_code == 200
        next(sse.iter_lines())
        # Open streams do not hold it; uvicorn exits by re-raising the signal it handled.
        assert nestor.signal(signal.SIGTERM, timeout=60) in (0, -signal.SIGTERM)
    assert gcs_servers() == clusters
    assert "1 job(s) still running on the embedded Ray" in (nestor.home / "serve.log").read_text()
    nestor.serve()
    assert gcs_servers() == clusters
    done = nestor.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert nestor.steps(job["id"]) == list(range(1, JOB["max_steps"] + 1))


def test_nestor_stop_stops_the_service_its_ray_and_its_jobs(nestor):
    job = nestor.client.submit({**JOB, "max_steps": 100_000}, name="stopped")
    nestor.wait_running(job["id"], 3)
    result = nestor.run("stop", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "1 job(s) recorded as cancelled" in result.stderr
    assert nestor.proc.wait(timeout=10) in (0, -signal.SIGTERM)
    assert not (nestor.home / "ray-cluster.json").exists()
    nestor.serve()  # a fresh cluster: the cancelled job stays cancelled, with its points
    stopped = nestor.client.job(job["id"])
    assert stopped["status"] == "cancelled" and stopped["last_step"] >= 3
    history = nestor.client.events(job["id"])
    assert "`nestor stop`" in history[-1]["reason"]


def test_nestor_train_after_the_service_has_stopped_trains_on_its_own_ray(nestor):
    """Ray's address file still names the stopped service's cluster; `nestor train`
    without an address used to join it and retry for ever."""
    clusters = gcs_servers()
    assert nestor.signal(signal.SIGTERM) in (0, -signal.SIGTERM)  # its Ray stops with it
    assert len(clusters - gcs_servers()) == 1
    # The user-project example: its code shipped to the private Ray as a working_dir.
    custom = ROOT / "examples" / "custom"
    spec = nestor.home / "custom.json"
    spec.write_text(json.dumps({**json.loads((custom / "spec.json").read_text()), "max_steps": 30}))
    out = nestor.home / "train-run"
    result = nestor.run("train", str(spec), "--code", str(custom), "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded" and summary["val_accuracy"] > 0.35  # 4 classes
    refused = nestor.run("train", str(spec), "--ray-address", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:" in refused.stderr
