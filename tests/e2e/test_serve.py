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
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy
import pytest
import torch

from service.client import Client

from ..helpers import free_port, read_jsonl

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


ATTACKER = '''
import json
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def _read(path):
    with open(path, "rb") as f:
        return f.read(1 << 20)


def _write(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT))


def _find(directory, name):
    """``name`` in ``directory``'s listing (the sandbox shows what the job may use)."""
    if name not in os.listdir(directory):
        raise FileNotFoundError(f"no {name} in {directory}")


def _entries(directory):
    if not os.listdir(directory):
        raise FileNotFoundError(f"{directory} shows nothing")


def _through_proc(home):
    """Any process's view of the machine (the service's among them), as /proc offers it."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            return _read(f"/proc/{pid}/root{home}/signing_key")
        except OSError:
            continue
    raise PermissionError("no process's root leads to the service's home")


def _service_environment():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"NESTOR_ADMIN_TOKEN" in _read(f"/proc/{pid}/environ"):
                return pid
        except OSError:
            continue
    raise PermissionError("no environment holding the admin token is readable")


def build(data, home, other_run):
    """Before building its model, look around as an attacker would."""
    tries = {
        "read the signing key": lambda: _read(f"{home}/signing_key"),
        "read the Ray token file": lambda: _read(f"{home}/ray-auth-token"),
        "read the database": lambda: _read(f"{home}/nestor.db"),
        "write the database": lambda: _write(f"{home}/nestor.db"),
        "create a file in the home": lambda: _write(f"{home}/planted"),
        "find the database in the home": lambda: _find(home, "nestor.db"),
        "list the packages": lambda: _entries(f"{home}/packages"),
        "find another job's run": lambda: _find(f"{home}/runs", os.path.basename(other_run)),
        "read another job's run": lambda: _read(f"{other_run}/spec.json"),
        "write another job's run": lambda: _write(f"{other_run}/planted"),
        "reach the home through /proc": lambda: _through_proc(home),
        "read the service's environment": _service_environment,
    }
    found = {}
    for what, attempt in tries.items():
        try:
            attempt()
            found[what] = "allowed"
        except OSError as e:
            found[what] = f"refused ({type(e).__name__})"
    secret = ("TOKEN", "SECRET", "KEY", "PASSWORD", "DATABASE")
    found["environment"] = sorted(k for k in os.environ if any(s in k.upper() for s in secret))
    found["nestor variables"] = sorted(k for k in os.environ if k.startswith("NESTOR_"))
    found["uid"] = os.getuid()
    print("FINDINGS " + json.dumps(found), flush=True)
    return nn.Sequential(nn.Linear(data.train[0][0].shape[0], 32), nn.ReLU(), nn.Linear(32, 4))


def load():
    """The package's own data file, read where Ray unpacked the package."""
    with np.load(os.path.join(os.path.dirname(__file__), "data.npz"), allow_pickle=False) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    return TensorDataset(x[400:], y[400:]), TensorDataset(x[:400], y[:400])
'''


def findings(client: Client, job_id: int) -> list[dict]:
    """The probe's reports, one per process that built the model, from the job's log."""
    lines = client.logs(job_id, limit=10_000)["lines"]  # each "[rank R] text"
    return [json.loads(line.split("FINDINGS ", 1)[1]) for line in lines if "FINDINGS " in line]


def job_processes(uid: int) -> list[int]:
    """Pids of the processes running as ``uid``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if proc.stat().st_uid == uid:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_jobs_code_cannot_reach_the_service_yet_trains_resumes_and_starts_from_another(
    nestor, tmp_path
):
    """On `nestor serve`'s defaults (root, bubblewrap): a user with the code scope uploads a
    package whose model factory tries every read and write of the service's state; each is
    refused in every worker; and the job still trains from its package's data, resumes after
    a worker's SIGKILL, writes its log and artifacts, and another job starts from its
    weights."""
    assert os.geteuid() == 0, "the embedded default under test runs the service as root"
    assert (
        "jobs run sandboxed (bubblewrap), each as a uid of its own"
        in (nestor.home / "serve.log").read_text()
    )
    user = nestor.client.create_user("mallory", ["read", "submit", "code"])
    mallory = Client(f"http://127.0.0.1:{nestor.port}", user["token"], timeout=10)
    project = tmp_path / "project"
    project.mkdir()
    (project / "probe.py").write_text(ATTACKER)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=g)
    y = (x[:, :4] * x[:, 4:8]).argmax(dim=1)
    numpy.savez(project / "data.npz", x=x.numpy(), y=y.numpy())
    other_run = next(p.parent for p in (nestor.home / "runs").glob("*/spec.json"))
    spec = {
        **JOB,
        "code": mallory.ensure_package(project),
        "model": {
            "factory": "probe:build",
            "kwargs": {"home": str(nestor.home), "other_run": str(other_run)},
        },
        "dataset": {"factory": "probe:load"},
        "max_steps": 40,
        "eval_every": 10,
        "checkpoint_every": 5,
    }
    job = mallory.submit(spec, name="looks around")

    def run_dir() -> Path | None:
        for owner in (nestor.home / "runs").glob("*/nestor-job.json"):
            if json.loads(owner.read_text())["job_id"] == job["id"]:
                return owner.parent
        return None

    def past_a_checkpoint() -> bool:
        directory = run_dir()
        try:
            rows = read_jsonl(directory / "metrics.jsonl") if directory else []
        except (OSError, ValueError):
            return False
        return bool(rows) and rows[-1].get("step", 0) >= 6

    deadline = time.time() + 300
    while not past_a_checkpoint():
        assert time.time() < deadline and nestor.client.job(job["id"])["status"] in (
            "queued",
            "running",
        ), nestor.client.job(job["id"])
        time.sleep(0.05)
    directory = run_dir()
    uid = directory.stat().st_uid
    assert uid >= 2_000_000_000 and stat.S_IMODE(directory.stat().st_mode) == 0o700
    # From outside: the job's processes (supervisor, driver, workers) run as its uid, each
    # in a mount namespace that is not the service's, with no Nestor secret in its
    # environment.
    processes = job_processes(uid)
    assert len(processes) >= 3, processes
    services = os.readlink("/proc/self/ns/mnt")
    for pid in processes:
        try:
            assert os.readlink(f"/proc/{pid}/ns/mnt") != services
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except FileNotFoundError:  # it ended meanwhile
            continue
        assert b"NESTOR_ADMIN_TOKEN" not in environ and ADMIN.encode() not in environ
    workers = read_jsonl(directory / "workers.jsonl")
    os.kill(next(w["pid"] for w in workers if w["rank"] == 1), signal.SIGKILL)
    done = nestor.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert nestor.steps(job["id"]) == list(range(1, 41))  # resumed from its checkpoint
    assert len(read_jsonl(directory / "workers.jsonl")) >= 4  # both ranks started again

    reports = findings(mallory, job["id"])
    assert len(reports) >= 2, reports
    for report in reports:
        allowed = [what for what, how in report.items() if how == "allowed"]
        assert not allowed, report
        assert report["environment"] == ["RAY_AUTH_TOKEN"], report
        assert "NESTOR_ADMIN_TOKEN" not in report["nestor variables"], report
        assert report["uid"] == uid
    assert not (nestor.home / "planted").exists() and not (other_run / "planted").exists()
    names = {a["name"] for a in mallory.artifacts(job["id"])["data"]}
    assert {"model.pt", "optimizer.pt", "metrics.csv", "result.json"} <= names, names

    # Its weights start the next job, whose uid is another: read through its own sandbox.
    follow = mallory.submit(
        {**spec, "max_steps": 5, "init_from": {"job": job["id"]}}, name="starts from it"
    )
    done = nestor.wait(follow["id"])
    assert done["status"] == "succeeded", done
    first = nestor.client.metrics(follow["id"], keys=["train_loss"])["series"]["train_loss"]
    start = nestor.client.metrics(job["id"], keys=["train_loss"])["series"]["train_loss"]
    assert first["value"][0] < start["value"][0]  # trained weights, not a fresh model


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
