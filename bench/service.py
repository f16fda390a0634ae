"""Metric ingest rate and API latency: the Nestor service beside an MLflow tracking server.

Both servers run on loopback in their own processes with SQLite stores, one server process
each; the same client threads drive them, alternating round by round:

- ingest: 4 threads, each sending batches of 200 steps x 5 keys (1000 values, MLflow's
  log-batch limit) for its own job / run (Nestor: POST /v1/jobs/{id}/ingest; MLflow:
  POST /api/2.0/mlflow/runs/log-batch);
- create: p50/p99 latency of POST /v1/jobs vs POST runs/create, 4 concurrent threads;
- read: p50/p99 of GET /v1/jobs/{id}/metrics (one 10k-point series, max_points=1000) vs
  GET metrics/get-history (the same 10k points; MLflow has no downsampling).

    python bench/service.py [--rounds 2] [--batches 40] [--tree DIR ...] [--no-mlflow]
                            [--db sqlite|postgresql]

``--tree DIR`` runs another checkout's service too, interleaved round by round with this
one's (a before/after comparison in one run).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.postgres import postgres_server

ROOT = Path(__file__).resolve().parent.parent
THREADS, STEPS_PER_BATCH, KEYS = 4, 200, ("loss", "val_loss", "lr", "grad_norm", "acc")
TOKEN = "nst_bench_admin_token"
SPEC = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d"},
    "optimizer": {"name": "adan"},
    "batch_size": 256,
    "micro_batch_size": 256,
    "num_workers": 1,
    "max_steps": 10,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def start_nestor(
    tmp: Path, tree: Path = ROOT, db_url: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`nestor serve --api-only` of the checkout at ``tree`` (another build, for a
    before/after run): the server a user runs, with its settings (GIL switch interval,
    frozen heap), on SQLite in a fresh home or on ``db_url``."""
    port = free_port()
    home = tmp / f"nestor-{port}"
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        NESTOR_HOME=str(home),
        NESTOR_PORT=str(port),
        NESTOR_ADMIN_TOKEN=TOKEN,
    )
    if db_url:
        env["NESTOR_DATABASE_URL"] = db_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--api-only"],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz")
    return proc, url


def start_mlflow(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--default-artifact-root",
            str(tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return proc, url


class Nestor:
    name = "Nestor (FastAPI, SQLite)"

    def __init__(self, url: str, name: str | None = None) -> None:
        self.name = name or self.name
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )

    def new_run(self) -> int:
        return self.http.post("/v1/jobs", json={"name": "bench", "spec": SPEC}).json()["id"]

    def log(self, run: int, first_step: int) -> None:
        points = [
            {"step": s, "time": time.time(), "values": {k: 0.5 for k in KEYS}}
            for s in range(first_step, first_step + STEPS_PER_BATCH)
        ]
        r = self.http.post(f"/v1/jobs/{run}/ingest", json={"points": points})
        r.raise_for_status()

    def read(self, run: int) -> None:
        self.http.get(
            f"/v1/jobs/{run}/metrics", params={"keys": "loss", "max_points": 1000}
        ).raise_for_status()


class MLflow:
    name = "MLflow tracking server (SQLite)"

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=f"{url}/api/2.0/mlflow", timeout=60)
        self.experiment = self.http.post(
            "/experiments/create", json={"name": f"bench-{time.time()}"}
        ).json()["experiment_id"]

    def new_run(self) -> str:
        r = self.http.post(
            "/runs/create",
            json={"experiment_id": self.experiment, "start_time": int(time.time() * 1000)},
        )
        return r.json()["run"]["info"]["run_id"]

    def log(self, run: str, first_step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [
            {"key": k, "value": 0.5, "timestamp": now, "step": s}
            for s in range(first_step, first_step + STEPS_PER_BATCH)
            for k in KEYS
        ]
        self.http.post(
            "/runs/log-batch", json={"run_id": run, "metrics": metrics}
        ).raise_for_status()

    def read(self, run: str) -> None:
        self.http.get(
            "/metrics/get-history",
            params={"run_id": run, "metric_key": "loss", "max_results": 25000},
        ).raise_for_status()


def new_database(url: str, name: str) -> str:
    """A fresh database on the server of ``url``; its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def add_tree_option(parser: argparse.ArgumentParser) -> None:
    """``--tree DIR`` (repeatable): also run the service of another checkout, for a
    before/after comparison in one run (bench/service.py, dashboard.py, load.py)."""
    parser.add_argument(
        "--tree",
        type=Path,
        action="append",
        default=[],
        help="also run the service of another checkout (git worktree add DIR REV), "
        "in the same run as this one: a before/after comparison",
    )


def rev(tree: Path) -> str:
    """The checkout's short commit, to label its row."""
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or tree.name


def concurrently(fn, n: int) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def ingest_rate(server, batches: int) -> float:
    runs = [server.new_run() for _ in range(THREADS)]
    start = time.perf_counter()
    concurrently(
        lambda i: [server.log(runs[i], 1 + b * STEPS_PER_BATCH) for b in range(batches)], THREADS
    )
    values = THREADS * batches * STEPS_PER_BATCH * len(KEYS)
    return values / (time.perf_counter() - start)


def latencies(fn, count: int) -> list[float]:
    out: list[float] = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        for _ in range(count // THREADS):
            t0 = time.perf_counter()
            fn()
            with lock:
                out.append(time.perf_counter() - t0)

    concurrently(worker, THREADS)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1e3 if len(xs) > 1 else xs[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="per thread per round")
    add_tree_option(parser)
    parser.add_argument("--no-mlflow", action="store_true", help="Nestor builds only")
    parser.add_argument(
        "--db",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="Nestor's database: postgresql starts a private server, a database per build "
        "(MLflow stays on SQLite)",
    )
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        procs: list[subprocess.Popen] = []
        pg = stack.enter_context(postgres_server()) if args.db == "postgresql" else None
        try:
            servers: list = []
            for i, tree in enumerate([ROOT, *args.tree]):
                proc, url = start_nestor(Path(tmp), tree, pg and new_database(pg, f"nestor{i}"))
                procs.append(proc)
                label = None if tree == ROOT and not args.tree else f"Nestor ({rev(tree)})"
                if args.db == "postgresql":
                    label = f"{label or 'Nestor'}, PostgreSQL"
                servers.append(Nestor(url, label))
            if not args.no_mlflow:
                proc, mlflow_url = start_mlflow(Path(tmp))
                procs.append(proc)
                servers.append(MLflow(mlflow_url))
            for s in servers:  # a 10k-point series to read back
                run = s.new_run()
                for b in range(0, 10_000, STEPS_PER_BATCH):
                    s.log(run, b + 1)
                s.read_run = run
            for _ in range(args.rounds):
                for s in servers:
                    r = results.setdefault(s.name, {"ingest": [], "create": [], "read": []})
                    r["ingest"].append(ingest_rate(s, args.batches))
                    r["create"] += latencies(s.new_run, 40)
                    r["read"] += latencies(lambda s=s: s.read(s.read_run), 40)
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
    print(
        f"{THREADS} client threads, batches of {STEPS_PER_BATCH * len(KEYS)} values, "
        f"{args.rounds} interleaved rounds, loopback, one server process each"
    )
    print(
        "| server | ingest values/s | create p50 ms | create p99 ms | read p50 ms | read p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {statistics.median(r['ingest']):,.0f} | {pct(r['create'], 50):.1f} "
            f"| {pct(r['create'], 99):.1f} | {pct(r['read'], 50):.1f} | "
            f"{pct(r['read'], 99):.1f} |"
        )
    names = list(results)
    if MLflow.name in results:
        ratio = statistics.median(results[names[0]]["ingest"]) / statistics.median(
            results[MLflow.name]["ingest"]
        )
        print(f"Nestor ingests {ratio:.1f}x MLflow's rate")
    for other in names[1 : 1 + len(args.tree)]:
        this, that = results[names[0]], results[other]
        change = [
            f"{key} {statistics.median(this[key]) / statistics.median(that[key]) - 1:+.1%}"
            if key == "ingest"
            else f"{key} p50 {pct(this[key], 50) / pct(that[key], 50) - 1:+.1%}"
            for key in ("ingest", "create", "read")
        ]
        print(f"{names[0]} against {other}: " + ", ".join(change))


if __name__ == "__main__":
    main()
