"""The service end to end on a real local Ray: a job runs, is cancelled, and survives an
API server restart with no metric point lost."""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest
import uvicorn

from service.app import create_app
from service.client import Client
from service.settings import Settings

ADMIN = "nst_lifecycle_admin"
TINY = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 2000},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 128,
    "num_workers": 2,
    "max_steps": 20,
    "eval_every": 10,
}


class LiveService:
    """uvicorn serving the app in a thread, on a fixed loopback port (restartable)."""

    def __init__(self, settings: Settings, cluster) -> None:
        self.settings, self.cluster = settings, cluster
        self.server: uvicorn.Server | None = None

    def start(self) -> None:
        app = create_app(self.settings, cluster=self.cluster)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("service did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("svc")
    settings = Settings(home=home, admin_token=ADMIN, port=port, scheduler_interval=0.5)
    live = LiveService(settings, ray_cluster)
    live.start()
    yield live, Client(f"http://127.0.0.1:{port}", ADMIN)
    live.stop()


def wait_for(fn, timeout=180.0, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def wait_for_sweep(client, sweep_id, timeout=400.0):
    """The sweep's detail once it is no longer running."""

    def ended():
        detail = client.sweep_detail(sweep_id)
        return detail if detail["status"] != "running" else None

    return wait_for(ended, timeout=timeout, every=1.0)


def test_job_runs_to_success_with_metrics_and_events(service):
    _, client = service
    job = client.submit(TINY, name="tiny")
    done = client.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    losses = client.metrics(job["id"], keys=["train_loss"])["series"]["train_loss"]
    assert losses["step"] == list(range(1, 21))
    assert [e["status"] for e in client.events(job["id"])] == ["queued", "running", "succeeded"]


def test_cancel_stops_a_running_job(service):
    _, client = service
    job = client.submit({**TINY, "max_steps": 100000}, name="long")
    wait_for(lambda: client.job(job["id"])["last_step"] >= 2)
    client.cancel(job["id"])
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "cancelled"


def test_api_restart_mid_job_loses_no_metric_point(service):
    live, client = service
    job = client.submit({**TINY, "max_steps": 150}, name="restart")
    wait_for(lambda: client.job(job["id"])["last_step"] >= 3)
    live.stop()
    time.sleep(3)  # the job keeps training; its reporter buffers and retries
    live.start()
    done = client.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded"
    steps = client.metrics(job["id"], keys=["train_loss"], max_points=10_000)
    assert steps["series"]["train_loss"]["step"] == list(range(1, 151))


def test_grid_sweep_runs_every_trial_within_max_concurrent(service):
    _, client = service
    base = {**TINY, "max_steps": 8, "eval_every": 4}
    sweep = client.sweep(
        {
            "name": "grid",
            "base": base,
            "max_concurrent": 1,
            "space": {"optimizer.name": ["adan", "adamw", "lamb"]},
        }
    )
    assert sweep["trials"] == 3

    done = wait_for_sweep(client, sweep["id"])
    assert done["status"] == "succeeded"
    assert {t["status"] for t in done["trials_summary"]} == {"succeeded"}
    assert {t["varied"]["optimizer.name"] for t in done["trials_summary"]} == {
        "adan",
        "adamw",
        "lamb",
    }
    assert all("val_loss" in t["final"] for t in done["trials_summary"])
    # max_concurrent = 1: no two trials' [started, finished] intervals overlap.
    jobs = sorted(
        (client.job(t["job_id"]) for t in done["trials_summary"]), key=lambda j: j["started_at"]
    )
    for a, b in itertools.pairwise(jobs):
        assert a["finished_at"] <= b["started_at"], (a, b)


def test_sweep_survives_an_api_restart(service):
    live, client = service
    base = {**TINY, "max_steps": 60, "eval_every": 20}
    sweep = client.sweep(
        {
            "name": "restart",
            "base": base,
            "max_concurrent": 1,
            "space": {"optimizer.name": ["adan", "lamb"]},
        }
    )
    first = wait_for(
        lambda: [
            t for t in client.sweep_detail(sweep["id"])["trials_summary"] if t["last_step"] >= 2
        ]
    )
    live.stop()  # mid-trial: one running, one still queued
    time.sleep(2)
    live.start()
    done = wait_for_sweep(client, sweep["id"])
    assert done["status"] == "succeeded"
    assert [t["status"] for t in done["trials_summary"]] == ["succeeded", "succeeded"]
    assert first[0]["job_id"] in [t["job_id"] for t in done["trials_summary"]]
    assert all(t["last_step"] == 60 for t in done["trials_summary"])


def test_asha_stops_the_diverging_trials_of_a_sweep(service):
    """Two learning rates that train and two that blow the loss up (finite, so the trials are
    not failed by the NaN policy): ASHA stops the blown-up ones at their first rungs against the
    curves of the good ones, and their metrics stay."""
    _, client = service
    base = {
        **TINY,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "num_workers": 1,
        "micro_batch_size": 256,
        "max_steps": 1500,  # long enough that a stop lands before a bad trial could end
        "eval_every": 10,
    }
    sweep = client.sweep(
        {
            "name": "asha",
            "base": base,
            "max_concurrent": 2,
            "space": {"optimizer.lr": [0.003, 0.01, 3.0, 5.0]},
            "early_stopping": {
                "metric": "val_loss",
                "mode": "min",
                "grace_period": 10,
                "reduction_factor": 2,
            },
        }
    )
    done = wait_for_sweep(client, sweep["id"], timeout=600)
    by_lr = {t["varied"]["optimizer.lr"]: t for t in done["trials_summary"]}
    for lr in (3.0, 5.0):
        trial = by_lr[lr]
        assert trial["status"] == "stopped_early", trial
        assert trial["last_step"] < 1500
        job = client.job(trial["job_id"])
        assert "stopped early by ASHA at step 10:" in job["stop_reason"], job["stop_reason"]
        kept = client.metrics(trial["job_id"], keys=["val_loss"])["series"]["val_loss"]
        assert kept["step"] and kept["step"][0] == 10
    # The good trials meet only each other at their rungs, so at least one runs to the end.
    good = [by_lr[lr] for lr in (0.003, 0.01)]
    assert any(t["status"] == "succeeded" and t["last_step"] == 1500 for t in good), good
    assert done["status"] == "succeeded"
