"""The service process: time from `nestor serve --api-only` to its first answer, its idle
RSS, and whether torch is loaded, for this checkout and (optionally) others side by side.

Each round starts one fresh process per checkout (interleaved), with a fresh NESTOR_HOME
(SQLite, migrated on start): the time is from the process's start until GET /healthz answers
200; RSS is read from /proc after 3 s idle; torch counts as loaded if libtorch is mapped.

    python bench/service_start.py [--rounds 5] [--tree /path/to/another/checkout ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(tree: Path) -> tuple[float, int, bool]:
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, NESTOR_HOME=home, NESTOR_ADMIN_TOKEN="nst_bench_start")
        code = (
            f"import sys; sys.path.insert(0, {str(tree)!r}); from service.cli import main; "
            f"sys.exit(main(['serve', '--api-only', '--port', '{port}']))"
        )
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the service in {tree} exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            seconds = time.perf_counter() - start
            time.sleep(3)
            rss = 0
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
            torch = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return seconds, rss, torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="another checkout")
    args = parser.parse_args()
    trees = [ROOT] + [Path(t).resolve() for t in args.tree]
    runs: dict[Path, list[tuple[float, int, bool]]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            runs[tree].append(one_start(tree))
    print(f"`nestor serve --api-only`, {args.rounds} starts each, {os.cpu_count()} CPUs")
    print()
    print("| checkout | start to first answer s (median) | idle RSS MiB (median) | torch loaded |")
    print("|---|---|---|---|")
    for tree, rs in runs.items():
        label = "this checkout" if tree == ROOT else str(tree)
        print(
            f"| {label} | {statistics.median(r[0] for r in rs):.2f} | "
            f"{statistics.median(r[1] for r in rs) / MiB:.0f} | "
            f"{'yes' if any(r[2] for r in rs) else 'no'} |"
        )


if __name__ == "__main__":
    main()
