"""Downloading a 1 GiB artifact through the API beside reading the same file from disk.

`nestor serve --api-only` on loopback (SQLite in a temporary NESTOR_HOME, no Ray), one job
whose run directory holds a ``model.pt`` of random bytes. Round by round, alternating:

- disk: the file read in 1 MiB chunks by this process (the rate to match);
- API (httpx): ``GET /v1/jobs/{id}/artifacts/model.pt`` with the bearer token, streamed and
  discarded (``iter_raw``), as a Python client gets it;
- API (curl): the signed link from the listing, ``curl -s -o /dev/null``: a client that is
  not itself the bottleneck;
- peer: the same file from ``python -m http.server`` (the standard library's static file
  server, a plain 64 KiB read/write loop), with curl: what an HTTP server on loopback reaches
  on this machine.

Each runs with the file in the page cache ("warm": read once before, the service's own cost)
and evicted from it ("cold": ``posix_fadvise(DONTNEED)`` on this one file before each read,
so no root and nothing else's cache is touched). The first listing hashes the file (SHA-256,
cached in the run directory afterwards): it is timed apart, cold, as part of the cost of the
first download. "Nestor CPU" is the service process's CPU seconds during each read (median).

    python bench/artifacts.py [--rounds 3] [--gigabytes 1] [--cache warm|cold|both]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import httpx  # noqa: E402

from service.db import Database  # noqa: E402
from service.models import Job  # noqa: E402
from service.settings import Settings  # noqa: E402

TOKEN = "nst_bench_artifacts_admin"
CHUNK = 1 << 20
# The same job spec and port helper as the service benchmark (loaded by path: as a module
# name, "service" is Nestor's package).
_loader = importlib.util.spec_from_file_location("bench_service", Path(_HERE) / "service.py")
bench_service = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(bench_service)
SPEC, free_port = bench_service.SPEC, bench_service.free_port


def start_nestor(home: Path) -> tuple[subprocess.Popen, str]:
    """`nestor serve --api-only` on a free loopback port, once /healthz answers."""
    port = free_port()
    env = dict(os.environ, NESTOR_HOME=str(home), NESTOR_ADMIN_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--api-only", "--port", str(port)],
        cwd=_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nestor serve exited with {proc.returncode} before {url} was up")
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"nestor serve did not answer on {url} within 120 s")


def start_static(directory: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` serving ``directory`` on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1", "-d", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.head(f"{url}/", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"http.server did not answer on {url} within 30 s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def write_random(path: Path, size: int) -> None:
    block = os.urandom(64 * CHUNK)  # random, so nothing on the way can compress it
    with open(path, "wb") as f:
        for i in range(0, size, len(block)):
            f.write(block[: size - i])
        f.flush()
        os.fsync(f.fileno())  # clean pages, so evicting them below really drops them


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_disk(path: Path) -> int:
    done = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while n := f.readinto(buf):
            done += n
    return done


def read_httpx(http: httpx.Client, url: str) -> int:
    done = 0
    with http.stream("GET", url) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            done += len(chunk)
    return done


def read_curl(url: str) -> int:
    out = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="GiB of model.pt")
    parser.add_argument("--cache", choices=["warm", "cold", "both"], default="both")
    args = parser.parse_args()
    size = int(args.gigabytes * (1 << 30))
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    curl = shutil.which("curl")
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "nestor"
        proc, url = start_nestor(home)
        static = None
        try:
            http = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            )
            job_id = http.post("/v1/jobs", json={"name": "bench", "spec": SPEC}).json()["id"]
            settings = Settings(home=home)  # the service's, read from the same home
            run_dir = settings.run_root / f"job-{job_id}"
            run_dir.mkdir(parents=True)
            model = run_dir / "model.pt"
            write_random(model, size)
            db = Database(settings.db_url)
            with db.sessions() as s:  # as the scheduler leaves a finished job
                job = s.get(Job, job_id)
                job.run_dir, job.status = str(run_dir), "succeeded"
                job.started_at = job.finished_at = datetime.now(UTC)
                s.commit()
            db.engine.dispose()

            evict(model)
            t0 = time.perf_counter()
            listing = http.get(f"/v1/jobs/{job_id}/artifacts")
            first_listing = time.perf_counter() - t0
            listing.raise_for_status()
            t0 = time.perf_counter()
            http.get(f"/v1/jobs/{job_id}/artifacts").raise_for_status()
            cached_listing = time.perf_counter() - t0
            (entry,) = listing.json()["data"]
            if (entry["name"], entry["size"]) != ("model.pt", size):
                raise RuntimeError(f"the listing has {entry}, not model.pt of {size} bytes")

            readers = {
                "disk (1 MiB reads)": lambda: read_disk(model),
                "API, httpx": lambda: read_httpx(http, f"/v1/jobs/{job_id}/artifacts/model.pt"),
            }
            if curl:
                static, static_url = start_static(run_dir)
                readers["API, curl (signed link)"] = lambda: read_curl(url + entry["url"])
                readers["peer: http.server, curl"] = lambda: read_curl(f"{static_url}/model.pt")
            read_disk(model)  # warm the cache once for the first "warm" round
            for _ in range(args.rounds):
                for cache in caches:
                    for name, read in readers.items():
                        if cache == "cold":
                            evict(model)
                        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                        got = read()
                        seconds = time.perf_counter() - t0
                        if got != size:
                            raise RuntimeError(f"{name}: read {got} bytes of {size}")
                        rates.setdefault((cache, name), []).append(size / seconds / 1e6)
                        cpu.setdefault((cache, name), []).append(cpu_seconds(proc.pid) - cpu0)
            http.close()
        finally:
            for p in (proc, static):
                if p is not None:
                    p.terminate()
                    p.wait(timeout=30)

    print(
        f"{size / (1 << 30):g} GiB model.pt, {args.rounds} interleaved rounds, loopback, "
        f"`nestor serve --api-only` (SQLite), {os.cpu_count()} CPUs"
    )
    print("| page cache | reader | median MB/s | best MB/s | Nestor CPU s | vs disk (median) |")
    print("|---|---|---|---|---|---|")
    for cache in caches:
        disk = statistics.median(rates[(cache, "disk (1 MiB reads)")])
        for name in readers:
            r = rates[(cache, name)]
            used = f"{statistics.median(cpu[(cache, name)]):.2f}" if name.startswith("API") else "-"
            print(
                f"| {cache} | {name} | {statistics.median(r):,.0f} | {max(r):,.0f} | {used} | "
                f"{statistics.median(r) / disk:.0%} |"
            )
    hashed = size / first_listing / 1e6
    print(
        f"first listing (SHA-256 of the cold file): {first_listing:.2f} s ({hashed:,.0f} MB/s); "
        f"a later listing (digest cached): {cached_listing * 1e3:.0f} ms"
    )
    if not curl:
        print("curl not found: the curl and http.server rows are missing")


if __name__ == "__main__":
    main()
