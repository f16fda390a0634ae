"""The live service for end-to-end tests: uvicorn serving the app in a thread on loopback
(stoppable and restartable, like a server process), and bounded waiting loops."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import Settings

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
    """uvicorn serving the app in a thread, on a fixed loopback port (restartable); with a
    Ray cluster it schedules onto it, without one it is the API alone."""

    def __init__(self, settings: Settings, cluster=None) -> None:
        self.settings, self.cluster = settings, cluster
        self.server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def app(self):
        return self.server.config.app

    def start(self) -> None:
        app = create_app(self.settings, cluster=self.cluster, scheduler=self.cluster is not None)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
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


def run_dir(live: LiveService, job_id: int) -> Path:
    """The job's run directory (found by the owner record the launch writes into it)."""
    for owner in live.settings.run_root.glob("*/nestor-job.json"):
        if json.loads(owner.read_text())["job_id"] == job_id:
            return owner.parent
    raise AssertionError(f"no run directory for job {job_id}")


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
