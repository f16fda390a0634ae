"""Time until the job page of a 1,000,000-point run is drawn, in headless Chromium, beside the
same series in MLflow's UI; and what the page's metrics request costs for that series
against one of 10,000 points.

Nestor: `nestor serve --api-only` (SQLite) with a job whose train_loss has 1,000,000 steps
(plus lr, grad_norm, samples_per_s, opt_state_bytes every 100 steps and val_loss /
val_accuracy every 1000), sent through the ingest API in batches of 10,000 points; the page
is loaded signed in, and the time is navigation start -> every chart drawn (the page's
`nestor:charts-drawn` mark, set after Plotly has drawn all six charts). The metrics request
is the page's own (`?keys=train_loss&max_points=2000`), timed from a client, for the long
job and for a job of 10,000 steps. MLflow: the same 1,000,000-point train_loss logged
through log-batch to an MLflow tracking server (SQLite store), and the time from navigation
start to the run's metric chart having a drawn trace. Cold = first load in a fresh browser
context (no cache); warm = median of the following loads. ``--tree DIR`` runs another
checkout's service the same way (a before/after comparison in one run).

    python bench/dashboard.py [--points 1000000] [--loads 5] [--skip-mlflow] [--tree DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

# bench/service.py's launchers, loaded by path (its module name is taken).
_loader = importlib.util.spec_from_file_location("bench_service", Path(_HERE) / "service.py")
bench_service = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(bench_service)

TOKEN = bench_service.TOKEN
CHROMIUM = "/usr/bin/chromium"
SPEC = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d"},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 256,
    "num_workers": 1,
    "max_steps": 1_000_000,
}
PER_REQUEST = 10_000  # points per ingest request (the API's limit)


def loss_curve(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1)
    loss = 2.3 * np.exp(-steps / (n / 8)) + 0.1 + 0.05 * rng.standard_normal(n)
    loss[rng.choice(n, 20, replace=False)] += 3.0  # spikes the chart must keep
    return loss


def seed_nestor(http: httpx.Client, name: str, n: int) -> int:
    """A succeeded job with ``n`` train_loss steps and the page's other series, through the
    ingest API."""
    job_id = (
        http.post("/v1/jobs", json={"name": name, "spec": SPEC}).raise_for_status().json()["id"]
    )
    loss = loss_curve(n)
    points = []

    def send(status: str | None = None) -> None:
        body = {"points": points, **({"status": status} if status else {})}
        http.post(f"/v1/jobs/{job_id}/ingest", json=body).raise_for_status()
        points.clear()

    send("running")
    for step in range(1, n + 1):
        values = {"train_loss": float(loss[step - 1])}
        if step % 100 == 0:
            values |= {"lr": 0.01, "grad_norm": 1.0, "samples_per_s": 5e4, "opt_state_bytes": 1e6}
        if step % 1000 == 0:
            values |= {"val_loss": float(loss[step - 1]), "val_accuracy": 0.9}
        points.append({"step": step, "time": 0.0, "values": values})
        if len(points) == PER_REQUEST:
            send()
    send("succeeded")
    return job_id


def request_times(http: httpx.Client, job_id: int, count: int = 20) -> list[float]:
    """The page's metrics request for train_loss, ``count`` times, in seconds."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        http.get(
            f"/v1/jobs/{job_id}/metrics", params={"keys": "train_loss", "max_points": 2000}
        ).raise_for_status()
        times.append(time.perf_counter() - t0)
    return times


def time_nestor(browser, url: str, job_id: int, loads: int) -> list[float]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.goto(url + "/")
    page.fill("#token", TOKEN)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#jobs-table")
    times = []
    for _ in range(loads):
        page.goto("about:blank")
        page.goto(f"{url}/jobs/{job_id}")
        page.wait_for_function("document.body.dataset.drawn === 'true'", timeout=60_000)
        ms = page.evaluate("performance.getEntriesByName('nestor:charts-drawn')[0].startTime")
        n = page.evaluate("document.getElementById('chart-loss').data[0].x.length")
        parts = page.evaluate(
            "performance.getEntriesByType('resource').map(e => "
            "[e.name.split('/').pop().split('?')[0], e.startTime, e.responseEnd])"
        )
        times.append(ms / 1000)
        where = ", ".join(f"{name} {a / 1000:.2f}-{b / 1000:.2f}" for name, a, b in parts)
        print(f"  nestor load: {ms / 1000:.2f} s ({n} loss points drawn; {where})", flush=True)
    context.close()
    return times


def time_mlflow(browser, tmp: Path, n: int, loads: int) -> list[float] | str:
    proc, url = bench_service.start_mlflow(tmp)
    try:
        http = httpx.Client(base_url=url, timeout=120)
        run = http.post("/api/2.0/mlflow/runs/create", json={"experiment_id": "0"}).json()
        run_id = run["run"]["info"]["run_id"]
        loss = loss_curve(n)
        t = time.time()
        for first in range(0, n, 1000):
            metrics = [
                {"key": "train_loss", "value": float(loss[i]), "timestamp": 0, "step": i + 1}
                for i in range(first, min(n, first + 1000))
            ]
            http.post("/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": metrics})
        print(f"  mlflow: logged {n} points in {time.time() - t:.0f} s", flush=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        times = []
        for _ in range(loads):
            page.goto("about:blank")  # a real page load each time, not an in-app hash change
            start = time.perf_counter()
            page.goto(f"{url}/#/experiments/0/runs/{run_id}/model-metrics")
            try:
                page.wait_for_selector(".js-plotly-plot .scatterlayer .trace path", timeout=60_000)
            except Exception as err:
                page.screenshot(path=str(tmp / "mlflow.png"))
                return f"no drawn chart within 60 s ({type(err).__name__})"
            times.append(time.perf_counter() - start)
            page.screenshot(path=str(tmp / "mlflow.png"))
            print(f"  mlflow load: {times[-1]:.2f} s (screenshot {tmp / 'mlflow.png'})", flush=True)
        context.close()
        return times
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def summary(name: str, times: list[float] | str) -> None:
    if isinstance(times, str):
        print(f"{name:<48} {times}")
        return
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    print(f"{name:<48} cold {times[0]:.2f} s   warm median {warm:.2f} s   (target <= 1 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--skip-mlflow", action="store_true")
    bench_service.add_tree_option(parser)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nestor-bench-dash-"))
    pages: dict[str, list[float]] = {}
    requests: dict[str, tuple[list[float], list[float]]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        for tree in [bench_service.ROOT, *args.tree]:
            name = f"Nestor ({bench_service.rev(tree)})"
            proc, url = bench_service.start_nestor(tmp, tree)
            try:
                http = httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
                )
                t = time.time()
                long = seed_nestor(http, "million-points", args.points)
                short = seed_nestor(http, "ten-thousand-points", 10_000)
                print(
                    f"{name}: seeded {args.points:,} points in {time.time() - t:.0f} s", flush=True
                )
                pages[name] = time_nestor(browser, url, long, args.loads)
                requests[name] = (request_times(http, short), request_times(http, long))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        mlflow = (
            "skipped" if args.skip_mlflow else time_mlflow(browser, tmp, args.points, args.loads)
        )
        browser.close()
    print()
    print(f"job page with {args.points:,} train_loss points, headless Chromium, loopback")
    for name, times in pages.items():
        summary(f"{name} /jobs/{{id}} (all six charts)", times)
    summary("MLflow run page (model metrics chart)", mlflow)
    print()
    print("the page's metrics request (train_loss, max_points=2000), 20 times each, ms")
    print("| server | 10k points p50 / p99 | 1M points p50 / p99 | 1M / 10k (p50) |")
    print("|---|---|---|---|")
    for name, (short, long) in requests.items():
        q = [statistics.quantiles(x, n=100) for x in (short, long)]
        print(
            f"| {name} | {1e3 * statistics.median(short):.1f} / {1e3 * q[0][98]:.1f} "
            f"| {1e3 * statistics.median(long):.1f} / {1e3 * q[1][98]:.1f} "
            f"| {statistics.median(long) / statistics.median(short):.2f}x |"
        )


if __name__ == "__main__":
    main()
