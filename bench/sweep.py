"""Scheduling overhead of a 24-trial sweep of tiny jobs on the embedded service.

Starts `nestor serve` (SQLite, a local Ray it starts) in a fresh NESTOR_HOME, submits a
24-trial grid sweep of 1-worker, 3-step jobs with max_concurrent equal to the CPUs, and
measures: wall time from submitting the sweep to the last trial's end; the trials' own
time (each job's started_at -> finished_at, summed and divided by the concurrency); and the
difference, the scheduling overhead (queueing, Ray job submission, status reconciliation).
The peer is the jobs themselves: a Ray Train job's own start-up dominates both.

    python bench/sweep.py [--trials 24]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from service.client import Client  # noqa: E402

TOKEN = "nst_bench_sweep_admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    base = {
        "model": "digits-mlp",
        "dataset": {"name": "digits"},
        "optimizer": {"name": "adan", "lr": 0.01},
        "batch_size": 256,
        "micro_batch_size": 256,
        "num_workers": 1,
        "max_steps": 3,
        "eval_every": 3,
    }
    lrs = [round(0.001 * (i + 1), 4) for i in range(args.trials)]
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        env = dict(os.environ, NESTOR_HOME=home, NESTOR_ADMIN_TOKEN=TOKEN)
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = Client(f"http://127.0.0.1:{port}", TOKEN)
            for _ in range(240):
                try:
                    client.jobs()
                    break
                except Exception:
                    time.sleep(0.5)
            start = time.time()
            sweep = client.sweep(
                {
                    "name": "overhead",
                    "base": base,
                    "max_concurrent": cpus,
                    "space": {"optimizer.lr": lrs},
                }
            )
            while client.sweep_detail(sweep["id"])["status"] == "running":
                time.sleep(0.5)
            wall = time.time() - start
            jobs = [
                client.job(t["job_id"]) for t in client.sweep_detail(sweep["id"])["trials_summary"]
            ]
        finally:
            server.terminate()
            server.wait(timeout=120)
    own = [
        datetime.fromisoformat(j["finished_at"]).timestamp()
        - datetime.fromisoformat(j["started_at"]).timestamp()
        for j in jobs
    ]
    ideal = sum(own) / cpus
    ok = sum(j["status"] == "succeeded" for j in jobs)
    print(
        f"{args.trials}-trial sweep of 1-worker, 3-step digits-mlp jobs, max_concurrent "
        f"{cpus}, embedded service and Ray ({ok}/{len(jobs)} succeeded)"
    )
    print("| sweep wall s | trials' own time s (sum / concurrency) | overhead s | per trial s |")
    print("|---|---|---|---|")
    print(f"| {wall:.1f} | {ideal:.1f} | {wall - ideal:.1f} | {(wall - ideal) / len(jobs):.2f} |")
    print(f"mean trial (Ray job start to end) {sum(own) / len(own):.1f} s")


if __name__ == "__main__":
    main()
