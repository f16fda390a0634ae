"""Time until the job page of a 1,000,000-point run is drawn, in headless Chromium, beside the
same series in MLflow's UI.

Nestor: a job whose train_loss has 1,000,000 steps (plus lr, grad_norm, samples_per_s,
opt_state_bytes every 100 steps and val_loss/val_accuracy every 1000), stored by the service's
own ingest path into SQLite; the page is loaded signed in, and the time is navigation start ->
every chart drawn (the page's `nestor:charts-drawn` mark, set after Plotly has drawn all six
charts). MLflow: the same 1,000,000-point train_loss in a run logged through log-batch to an
MLflow tracking server (SQLite store), and the time from navigation start to the run's metric
chart having a drawn trace. Cold = first load in a fresh browser context (no cache); warm =
median of the following loads.

    python bench/dashboard.py [--points 1000000] [--loads 5] [--skip-mlflow]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from service.app import create_app  # noqa: E402
from service.jobs import create_job, store_points, transition  # noqa: E402
from service.settings import Settings  # noqa: E402

TOKEN = "nst_bench_dashboard_token"
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


def loss_curve(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1)
    loss = 2.3 * np.exp(-steps / (n / 8)) + 0.1 + 0.05 * rng.standard_normal(n)
    loss[rng.choice(n, 20, replace=False)] += 3.0  # spikes the chart must keep
    return loss


def seed_nestor(settings: Settings, n: int) -> int:
    from service.db import Database, upgrade

    upgrade(settings.db_url)
    db = Database(settings.db_url)
    loss = loss_curve(n)
    with db.sessions() as s:
        job = create_job(s, "million-points", SPEC, 0)
        transition(s, job, "running", "bench")
        rows = []
        for step in range(1, n + 1):
            rows.append((step, "train_loss", float(loss[step - 1]), 0.0))
            if step % 100 == 0:
                for key, value in (
                    ("lr", 0.01),
                    ("grad_norm", 1.0),
                    ("samples_per_s", 5e4),
                    ("opt_state_bytes", 1e6),
                ):
                    rows.append((step, key, value, 0.0))
            if step % 1000 == 0:
                rows.append((step, "val_loss", float(loss[step - 1]), 0.0))
                rows.append((step, "val_accuracy", 0.9, 0.0))
            if len(rows) >= 100_000:
                store_points(s, job.id, rows)
                rows = []
        store_points(s, job.id, rows)
        s.commit()
        transition(s, job, "succeeded", "bench")
        return job.id


def serve(settings: Settings) -> str:
    app = create_app(settings, scheduler=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{settings.port}"
    for _ in range(200):
        if server.started:
            return url
        time.sleep(0.05)
    raise RuntimeError("service did not start")


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
    # bench/service.py's MLflow launcher, loaded by path (its module name is taken).
    loader = importlib.util.spec_from_file_location("bench_service", Path(_HERE) / "service.py")
    bench_service = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench_service)
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
        print(f"{name:<40} {times}")
        return
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    print(f"{name:<40} cold {times[0]:.2f} s   warm median {warm:.2f} s   (target <= 2 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nestor-bench-dash-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp / "nestor").mkdir()
    settings = Settings(home=tmp / "nestor", admin_token=TOKEN, port=port)
    t = time.time()
    job_id = seed_nestor(settings, args.points)
    print(f"seeded job {job_id}: {args.points} train_loss points in {time.time() - t:.0f} s")
    url = serve(settings)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        nestor = time_nestor(browser, url, job_id, args.loads)
        mlflow = (
            "skipped" if args.skip_mlflow else time_mlflow(browser, tmp, args.points, args.loads)
        )
        browser.close()
    print()
    print(f"job page with {args.points:,} train_loss points, headless Chromium, loopback")
    summary("Nestor /jobs/{id} (all six charts)", nestor)
    summary("MLflow run page (model metrics chart)", mlflow)


if __name__ == "__main__":
    main()
