"""Reading a data set bigger than a worker should hold: a 2 GB memory-mapped ``.npy`` data set
against the same arrays held in each worker's memory, on a 2-worker `nestor train`.

The data: MNIST-1D-shaped rows (40 float32 features, 10 classes: class templates plus
noise, so the model learns), 2 GB of inputs, generated once into a temporary directory.
Each configuration is its own `nestor train` (a fresh local Ray), all reading the same
files, with the same model (mnist1d-mlp), batch and steps:

- ``in-memory``: a data factory (shipped with ``--code``) that reads both arrays whole into
  each worker (``np.load`` without ``mmap_mode``): the rate to match;
- ``memmap``: the built-in file data set (``"dataset": {"path": DIR}``), memory-mapped,
  read through the DataLoader with 0 and with 1 worker process.

samples/s is the median over steps after the first three; peak RSS is the largest resident
set seen (sampled every 0.2 s) of each training worker together with its DataLoader
processes.

    python bench/data.py [--gigabytes 2] [--steps 40] [--model mnist1d-mlp | mnist1d-cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROW_FLOATS = 40

IN_MEMORY = """
import numpy as np
import torch
from workers.contract import ArrayDataset, Data


def load(path, val_path):
    def whole(d):
        x = torch.from_numpy(np.load(f"{d}/x.npy"))  # read into memory, no mmap
        y = torch.from_numpy(np.load(f"{d}/y.npy"))
        return ArrayDataset(x, y)

    return Data(whole(path), whole(val_path), "classification", 10)
"""


def make_data(directory: Path, rows: int, seed: int = 0) -> None:
    """Rows of 40 float32 features: one of 10 class templates (the same for every split)
    plus unit noise (drawn from ``seed``)."""
    templates = np.random.default_rng(1234).normal(0, 1, (10, ROW_FLOATS)).astype(np.float32)
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    x = np.lib.format.open_memmap(directory / "x.npy", "w+", np.float32, (rows, ROW_FLOATS))
    y = np.lib.format.open_memmap(directory / "y.npy", "w+", np.int64, (rows,))
    chunk = 1 << 20
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        labels = rng.integers(0, 10, hi - lo)
        noise = rng.standard_normal((hi - lo, ROW_FLOATS), dtype=np.float32)
        x[lo:hi] = templates[labels] + noise
        y[lo:hi] = labels
    x.flush()
    y.flush()


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def watch_rss(run_dir: Path, stop: threading.Event, peaks: dict[int, int]) -> None:
    """Peak RSS (KiB) per rank: the training worker plus its DataLoader processes."""
    while not stop.is_set():
        workers = run_dir / "workers.jsonl"
        if workers.exists():
            for line in workers.read_text().splitlines():
                w = json.loads(line)
                total = _rss_kb(w["pid"]) + sum(_rss_kb(c) for c in _children(w["pid"]))
                peaks[w["rank"]] = max(peaks.get(w["rank"], 0), total)
        time.sleep(0.2)


def run(name: str, spec: dict, out: Path, code: Path | None) -> dict:
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "service.cli", "train", str(spec_path), "--out", str(out)]
    if code:
        cmd += ["--code", str(code)]
    peaks: dict[int, int] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_rss, args=(out, stop, peaks), daemon=True)
    watcher.start()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    stop.set()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{name}: nestor train failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["samples_per_s"] for r in records[3:] if r.get("samples_per_s")]
    return {
        "samples_per_s": statistics.median(steady),
        "peak_rss_mb": [round(peaks[r] / 1024) for r in sorted(peaks)],
        "val_accuracy": records[-1].get("val_accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--micro", type=int, default=4096)
    parser.add_argument(
        "--model",
        default="mnist1d-mlp",
        help="mnist1d-mlp (77k parameters: little compute per sample, the hardest case for "
        "reading) or mnist1d-cnn",
    )
    args = parser.parse_args()
    rows = int(args.gigabytes * 1e9 / (4 * ROW_FLOATS))
    with tempfile.TemporaryDirectory(dir=os.environ.get("NESTOR_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        make_data(tmp / "train", rows)
        make_data(tmp / "val", 20_000, seed=1)
        size = (tmp / "train" / "x.npy").stat().st_size + (tmp / "train" / "y.npy").stat().st_size
        print(
            f"data: {rows:,} rows, {size / 1e9:.2f} GB on disk, written in "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
        code = tmp / "code"
        code.mkdir()
        (code / "inmem.py").write_text(IN_MEMORY)
        base = {
            "model": args.model,
            "optimizer": {"name": "adan", "lr": 0.003},
            "batch_size": args.batch,
            "micro_batch_size": args.micro,
            "num_workers": 2,
            "zero_stage": 2,
            "max_steps": args.steps,
            "eval_every": args.steps,
        }
        file_data = {"path": str(tmp / "train"), "val_path": str(tmp / "val")}
        configs = {
            "in-memory": (
                {
                    "dataset": {
                        "factory": "inmem:load",
                        "kwargs": {"path": str(tmp / "train"), "val_path": str(tmp / "val")},
                    },
                    "loader_workers": 0,
                },
                code,
            ),
            "memmap, 0 loader processes": ({"dataset": file_data, "loader_workers": 0}, None),
            "memmap, 1 loader process": ({"dataset": file_data, "loader_workers": 1}, None),
        }
        results = {}
        for name, (extra, code_dir) in configs.items():
            results[name] = run(name, {**base, **extra}, tmp / name.replace(" ", "_"), code_dir)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    ref = results["in-memory"]["samples_per_s"]
    print("\n| configuration | samples/s | vs in-memory | peak RSS per worker (MB) |")
    print("|---|---:|---:|---|")
    for name, r in results.items():
        rss = ", ".join(str(m) for m in r["peak_rss_mb"])
        print(f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / ref:.0%} | {rss} |")
    print(
        f"\n({args.model}; data set: {size / 1e9:.2f} GB; batch {args.batch}, micro-batch "
        f"{args.micro})"
    )


if __name__ == "__main__":
    main()
