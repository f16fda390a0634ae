"""Job start-up: submit -> first training step, through the service and through `nestor train`,
on a cold and a warm cluster; and a sweep's wall clock against its trials' own training time.

- **Service, cold**: `nestor serve` (SQLite, the embedded Ray it starts) in a fresh
  NESTOR_HOME; once it answers, one job is submitted: the time from the POST to the first
  step's record in the job's ``metrics.jsonl`` (its ``time`` field, written by rank 0 when
  step 1 ends). Repeated with a new service ``--cold`` times.
- **Service, warm**: ``--warm`` more jobs, one after another, on the last of those services
  (its Ray up, earlier jobs done).
- **`nestor train`, cold**: the CLI with a private Ray it starts (process start -> first step).
- **`nestor train`, warm**: the CLI joining the running service's cluster (`--ray-address`).
- **Sweep**: a ``--trials``-trial grid sweep (max_concurrent 1) on the warm service: its wall
  clock from the POST to its end against the sum of its trials' training time (first step's
  record to the last's, plus one step).

Every job is the same 2-worker mnist1d MLP with Adan at ZeRO-2, batch 256, reporting every
step. ``--tree`` runs everything for other checkouts too (PYTHONPATH, so that Ray's workers
import that checkout), one after another.

    python bench/startup.py [--warm 5] [--cold 3] [--trials 12] [--tree /other/checkout ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from service.client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "nst_bench_startup_admin"
SPEC = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 4000},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 128,
    "num_workers": 2,
    "zero_stage": 2,
    "max_steps": 10,
    "eval_every": 10,
    "log_every": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_time(run_dir: Path, timeout: float = 600) -> float:
    """The wall time at which step 1's record was written in ``run_dir/metrics.jsonl``."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    return json.loads(line)["time"]
                except (ValueError, KeyError):
                    break
        time.sleep(0.02)
    raise TimeoutError(f"no first step in {run_dir} after {timeout} s")


def step_times(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["time"] for line in lines]


class Service:
    """`nestor serve` from ``tree`` in a fresh home, stopped (with its Ray) on exit."""

    def __init__(self, tree: Path) -> None:
        self.tree, self.home = tree, Path(tempfile.mkdtemp(prefix="nestor-startup-"))
        self.env = dict(
            os.environ, NESTOR_HOME=str(self.home), NESTOR_ADMIN_TOKEN=TOKEN, PYTHONPATH=str(tree)
        )
        self.port = free_port()

    def __enter__(self) -> Service:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            cwd=self.tree,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = Client(f"http://127.0.0.1:{self.port}", TOKEN)
        for _ in range(600):
            try:
                self.client.jobs()
                return self
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError("the service exited") from None
                time.sleep(0.2)
        raise TimeoutError("the service did not answer")

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            [sys.executable, "-m", "service.cli", "stop"],
            cwd=self.tree,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
        self.proc.wait(timeout=120)

    def run_dir(self, job_id: int) -> Path:
        for _ in range(6000):
            found = list((self.home / "runs").glob(f"nestor-job-{job_id}-*"))
            if found:
                return found[0]
            time.sleep(0.02)
        raise TimeoutError(f"job {job_id} never got a run directory")

    def job(self) -> float:
        """Submit -> first step of one job; waits for the job's end."""
        start = time.time()
        job = self.client.submit(SPEC, name="startup")
        first = first_step_time(self.run_dir(job["id"]))
        done = self.client.wait(job["id"], timeout=600, poll=0.2)
        if done["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {done['status']}: {done.get('error')}")
        print(f"job {job['id']}: first step after {first - start:.2f} s", file=sys.stderr)
        return first - start

    def ray_env(self) -> tuple[str, dict[str, str]]:
        """The embedded cluster's GCS address and what a client of it needs (its token)."""
        state = json.loads((self.home / "ray-cluster.json").read_text())
        token = (self.home / "ray-auth-token").read_text().strip()
        env = dict(self.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return state["gcs_address"], env

    def sweep(self, trials: int) -> tuple[float, float]:
        """Wall clock of a ``trials``-trial sweep and the sum of its trials' training time."""
        start = time.time()
        sweep = self.client.sweep(
            {
                "name": "startup",
                "base": SPEC,
                "max_concurrent": 1,
                "space": {"optimizer.lr": [round(0.002 * (i + 1), 4) for i in range(trials)]},
            }
        )
        while self.client.sweep_detail(sweep["id"])["status"] == "running":
            time.sleep(0.2)
        wall = time.time() - start
        own = 0.0
        for trial in self.client.sweep_detail(sweep["id"])["trials_summary"]:
            times = step_times(self.run_dir(trial["job_id"]))
            own += (times[-1] - times[0]) * len(times) / max(1, len(times) - 1)
        return wall, own


def cli_train(tree: Path, env: dict[str, str], address: str | None) -> float:
    """`nestor train` from process start to its first step."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "run"
        spec.write_text(json.dumps(SPEC))
        cmd = [sys.executable, "-m", "service.cli", "train", str(spec), "--out", str(out)]
        if address:
            cmd += ["--ray-address", address]
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            first = first_step_time(out)
        finally:
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"nestor train exited with {proc.returncode}")
        return first - start


def measure(tree: Path, args: argparse.Namespace) -> dict[str, object]:
    cold, warm, cli_warm = [], [], []
    for i in range(args.cold):
        with Service(tree) as service:
            cold.append(service.job())
            if i < args.cold - 1:
                continue
            warm = [service.job() for _ in range(args.warm)]
            address, env = service.ray_env()
            cli_warm = [cli_train(tree, env, address) for _ in range(args.cli)]
            wall, own = service.sweep(args.trials)
    env = dict(os.environ, PYTHONPATH=str(tree), NESTOR_HOME=tempfile.mkdtemp())
    cli_cold = [cli_train(tree, env, None) for _ in range(args.cli)]
    return {
        "cold": cold,
        "warm": warm,
        "cli_cold": cli_cold,
        "cli_warm": cli_warm,
        "sweep": (wall, own),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=3, help="services started, one job each")
    parser.add_argument("--warm", type=int, default=5, help="jobs on the last service")
    parser.add_argument("--cli", type=int, default=3, help="`nestor train` runs, cold and warm")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--tree", action="append", default=[], help="another checkout")
    args = parser.parse_args()
    trees = [ROOT] + [Path(t).resolve() for t in args.tree]
    results = {tree: measure(tree, args) for tree in trees}
    print(
        f"Submit -> first step of a 2-worker ZeRO-2 Adan mnist1d job, {os.cpu_count()} CPUs, "
        f"median (min-max) of n; sweep: {args.trials} trials of that job, max_concurrent 1"
    )
    print()
    print(
        "| checkout | service, cold cluster s | service, warm s | `nestor train`, own Ray s "
        "| `nestor train`, warm cluster s | sweep wall s | trials' training s | overhead "
        "per trial s |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}, n={len(xs)})"

    for tree, r in results.items():
        wall, own = r["sweep"]
        label = "this checkout" if tree == ROOT else str(tree)
        print(
            f"| {label} | {cell(r['cold'])} | {cell(r['warm'])} | {cell(r['cli_cold'])} | "
            f"{cell(r['cli_warm'])} | {wall:.1f} | {own:.1f} | "
            f"{(wall - own) / args.trials:.2f} |"
        )


if __name__ == "__main__":
    main()
