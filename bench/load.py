"""The service under load: many live viewers and a heavy metric ingest at once.

`nestor serve` on loopback (the embedded Ray, a job training on it and streaming its metrics),
then, for ``--seconds``:

- ``--viewers`` server-sent-event streams on the running job's page (every open dashboard
  tab is one), plus ``--fast-viewers`` on a second job that receives the ingest below;
- a steady ingest of ``--rate`` metric points per second into that second job, sent in order
  in batches of 500 steps x 10 keys, as a job's reporter sends them (its batches hold up to
  500 steps: at this rate its queue always has that many);
- probes: ``GET /healthz`` and ``GET /v1/jobs`` one after the other, every 50 ms;
- samples of ``/metrics`` (pooled database connections in use) and of the service's RSS.

At the end both jobs end, every stream ends, and each viewer's count of points is compared
with the points stored for its job. Run on SQLite and on PostgreSQL (a private server started
for the run). Viewers, probes and the ingest run in processes of their own, so the client's
GIL does not add to the latencies measured. Targets: p99 <= 100 ms for both probes,
no 5xx, connections <= pool size, RSS growth <= 100 MB, every viewer sees every point.

    python bench/load.py [--db sqlite|postgresql|both] [--viewers 200] [--rate 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

# Run as a script, this folder heads sys.path and bench/service.py would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import httpx  # noqa: E402

TOKEN = "nst_bench_load_admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYS = [f"k{i}" for i in range(10)]
STEPS_PER_BATCH = 500  # workers.reporting.HttpReporter's max_batch
RUNNING = {
    "model": "digits-mlp",
    "dataset": {"name": "digits"},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 256,
    "num_workers": 1,
    "max_steps": 10_000_000,
    "eval_every": 50,
    "log_every": 10,  # a few hundred points a second, as a real model's steps give
}
# Waits in the queue behind RUNNING (it asks for both CPUs): a job that only receives points.
RECEIVING = {**RUNNING, "num_workers": 2, "batch_size": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_delay(pid: int) -> float:
    """Seconds the service's threads spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def steal() -> float:
    """Seconds of CPU the hypervisor gave to other machines (all CPUs; /proc/stat)."""
    return int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each kind of process on this machine."""
    roles: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not cmd:
                continue
            if int(proc.name) == server_pid:
                role = "service"
            elif "RayTrainWorker" in cmd or "workers.driver" in cmd or "TrainController" in cmd:
                role = "training job"
            elif "ray" in cmd or "gcs_server" in cmd or "raylet" in cmd:
                role = "Ray"
            elif "multiprocessing" in cmd or "bench/load.py" in cmd:
                role = "load clients"
            else:
                role = "other"
            roles[role] = roles.get(role, 0.0) + cpu_seconds(int(proc.name))
    return roles


def descendants(pid: int) -> set[int]:
    """``pid``'s children, their children, and so on (the service's Ray and its job)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (os.sched_setaffinity moves one thread)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def pin_service(server_pid: int) -> None:
    """The service (all its threads) on the first CPU; its Ray and the training job, the
    PostgreSQL server, and this benchmark with the clients it starts afterwards, on the
    others: the service on a core of its own, as a deployment gives it. Nothing else on the
    machine is touched."""
    cpus = sorted(os.sched_getaffinity(0))
    set_affinity(server_pid, {cpus[0]})
    for pid in (descendants(os.getpid()) | {os.getpid()}) - {server_pid}:
        set_affinity(pid, set(cpus[1:]))  # Ray, the job, PostgreSQL, this benchmark


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------- viewers
async def _view(port: int, job_id: int, counts: dict[int, int], index: int) -> None:
    """One viewer: read the job's stream to its end, counting the points in it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(
        (
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        counts[index] = -int(head.split()[1])
        writer.close()
        return
    # The body is chunked; a point is one '"step"' in a metrics message. Chunk framing can
    # split the marker, so carry the tail of each read over to the next.
    tail, seen, ended = b"", 0, False
    while not ended:
        data = await reader.read(1 << 20)
        if not data:
            break
        text = tail + data
        seen += text.count(b'"step"')
        ended = b"event: end" in text
        tail = text[-16:]
        seen -= tail.count(b'"step"')  # counted again with the next read
    seen += tail.count(b'"step"')
    counts[index] = seen
    writer.close()


def viewers_process(port: int, plan: list[int], out: mp.Queue, ready: mp.Event) -> None:
    async def run() -> dict[int, int]:
        counts: dict[int, int] = {}
        tasks = []
        for i, job_id in enumerate(plan):
            tasks.append(asyncio.create_task(_view(port, job_id, counts, i)))
            if i % 20 == 19:
                await asyncio.sleep(0.05)  # open them over a moment, as tabs are
        await asyncio.sleep(1.0)
        ready.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return counts

    out.put(asyncio.run(run()))


# ------------------------------------------------------------------------- probes
def probes_process(url: str, seconds: float, out: mp.Queue) -> None:
    lat: dict[str, list[float]] = {"healthz": [], "jobs": []}
    errors = 0
    deadline = time.time() + seconds
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        while time.time() < deadline:
            for name, path in (("healthz", "/healthz"), ("jobs", "/v1/jobs?limit=100")):
                t0 = time.perf_counter()
                r = http.get(path)
                lat[name].append((time.perf_counter() - t0) * 1000)
                errors += r.status_code >= 500
            time.sleep(0.05)
    out.put((lat, errors))


# ------------------------------------------------------------------------- ingest
def ingest_process(url: str, job_id: int, rate: int, seconds: float, out: mp.Queue) -> None:
    """Batches of 500 steps x 10 keys in order, paced to ``rate`` points per second."""
    per_batch = STEPS_PER_BATCH * len(KEYS)
    interval = per_batch / rate
    sent = errors = 0
    step = 0
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            points = [
                {
                    "step": step + i,
                    "time": 0.0,
                    "values": {k: step * 1e-6 + j for j, k in enumerate(KEYS)},
                }
                for i in range(1, STEPS_PER_BATCH + 1)
            ]
            step += STEPS_PER_BATCH
            r = http.post(f"/v1/jobs/{job_id}/ingest", json={"points": points})
            if r.status_code == 200:
                sent += r.json()["accepted"]
            errors += r.status_code >= 500
            n += 1
            pause = start + n * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        elapsed = time.perf_counter() - start
    out.put((sent, elapsed, errors))


# ------------------------------------------------------------------------- one run
def stored_points(db_url: str, job_id: int) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM metrics WHERE job_id = :j"), {"j": job_id})
        count = n.scalar()
    engine.dispose()
    return int(count)


def run(db: str, pinned: bool, args: argparse.Namespace) -> dict:
    from tests.postgres import postgres_server

    ctx = mp.get_context("spawn")
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nestor-load-")))
        db_url = (
            stack.enter_context(postgres_server())
            if db == "postgresql"
            else f"sqlite:///{home / 'nestor.db'}"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "NESTOR_HOME": str(home),
            "NESTOR_PORT": str(port),
            "NESTOR_ADMIN_TOKEN": TOKEN,
            "NESTOR_DATABASE_URL": db_url,
            # All viewers share the admin token here; the default limit is 32 per token.
            "NESTOR_MAX_STREAMS_PER_TOKEN": str(args.viewers + args.fast_viewers + 10),
        }
        log = open(home / "serve.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=log
        )
        stack.callback(lambda: (server.terminate(), server.wait(timeout=120)))
        stack.callback(
            lambda: subprocess.run(
                [sys.executable, "-m", "service.cli", "stop"],
                env=env,
                capture_output=True,
                timeout=180,
            )
        )
        http = stack.enter_context(httpx.Client(base_url=url, headers=AUTH, timeout=30))
        for _ in range(600):
            try:
                if http.get("/healthz").is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        running = http.post("/v1/jobs", json={"name": "running", "spec": RUNNING}).json()
        receiving = http.post("/v1/jobs", json={"name": "receiving", "spec": RECEIVING}).json()
        while http.get(f"/v1/jobs/{running['id']}").json()["last_step"] < 10:
            time.sleep(0.5)
        if pinned:
            pin_service(server.pid)
        rss_start = rss_mb(server.pid)

        plan = [running["id"]] * args.viewers + [receiving["id"]] * args.fast_viewers
        views, probes, ingest = ctx.Queue(), ctx.Queue(), ctx.Queue()
        ready = ctx.Event()
        viewer_proc = ctx.Process(target=viewers_process, args=(port, plan, views, ready))
        viewer_proc.start()
        ready.wait(timeout=120)
        procs = [
            ctx.Process(target=probes_process, args=(url, args.seconds, probes)),
            ctx.Process(
                target=ingest_process,
                args=(url, receiving["id"], args.rate, args.seconds, ingest),
            ),
        ]
        for p in procs:
            p.start()
        in_use, rss_peak = [], rss_start
        print(f"measuring ({db}, service pid {server.pid})", file=sys.stderr, flush=True)
        cpu_start, started = cpu_seconds(server.pid), time.time()
        wait_start, steal_start = run_delay(server.pid), steal()
        roles_start = cpu_by_role(server.pid)
        deadline = time.time() + args.seconds
        while time.time() < deadline:
            text = http.get("/metrics").text
            for line in text.splitlines():
                if line.startswith("nestor_db_connections_in_use "):
                    in_use.append(float(line.split()[1]))
                if line.startswith("nestor_db_pool_limit "):
                    pool = float(line.split()[1])
            rss_peak = max(rss_peak, rss_mb(server.pid))
            time.sleep(0.5)
        window = time.time() - started
        cpu = (cpu_seconds(server.pid) - cpu_start) / window
        waited = (run_delay(server.pid) - wait_start) / window
        stolen = (steal() - steal_start) / window
        roles = {
            k: (v - roles_start.get(k, 0.0)) / window
            for k, v in cpu_by_role(server.pid).items()
            if k != "other"
        }
        lat, probe_errors = probes.get(timeout=120)
        sent, elapsed, ingest_errors = ingest.get(timeout=120)
        for p in procs:
            p.join()
        rss_end = rss_mb(server.pid)
        http.post(f"/v1/jobs/{receiving['id']}/cancel")  # first: it must never start
        http.post(f"/v1/jobs/{running['id']}/cancel")
        counts = views.get(timeout=300)
        viewer_proc.join()
        want = {
            running["id"]: stored_points(db_url, running["id"]),
            receiving["id"]: stored_points(db_url, receiving["id"]),
        }
        complete = sum(counts.get(i) == want[job] for i, job in enumerate(plan))
        short = sorted(want[job] - counts.get(i, 0) for i, job in enumerate(plan))[-3:]
    return {
        "db": db,
        "pinned": pinned,
        "cpu": cpu,
        "waited": waited,
        "roles": roles,
        "stolen": stolen,
        "rate": sent / elapsed,
        "healthz": lat["healthz"],
        "jobs": lat["jobs"],
        "errors": probe_errors + ingest_errors,
        "in_use": max(in_use or [0.0]),
        "pool": pool,
        "rss": (rss_start, rss_peak, rss_end),
        "complete": complete,
        "viewers": len(plan),
        "short": short,
        "points": want,
    }


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--fast-viewers", type=int, default=10)
    parser.add_argument("--rate", type=int, default=50_000, help="points per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument(
        "--pin",
        choices=["both", "on", "off"],
        default="both",
        help="on: the service on a core of its own, everything else on the others",
    )
    args = parser.parse_args()
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    pins = {"both": [False, True], "on": [True], "off": [False]}[args.pin]
    if (os.cpu_count() or 1) < 2:
        pins = [False]
    everywhere = os.sched_getaffinity(0)
    results = []
    for pinned in pins:
        for db in dbs:
            results.append(run(db, pinned, args))
            set_affinity(os.getpid(), everywhere)  # pinning moved this process too
    print(
        f"`nestor serve` on loopback, {os.cpu_count()} CPUs (shared: every process on every "
        "core; a core of its own: the service on CPU 0, the job, Ray and the clients on the "
        f"rest); a digits-mlp job training and "
        f"reporting every 10 steps; {args.viewers} SSE viewers on it and {args.fast_viewers} on a "
        f"second job receiving {args.rate:,} points/s (batches of 500 steps x 10 keys); probes "
        f"every 50 ms; {args.seconds:.0f} s"
    )
    print(
        "| database | service's CPU | ingest points/s | /healthz p50 / p99 ms "
        "| GET /v1/jobs p50 / p99 ms | 5xx | DB connections in use, max (pool) "
        "| RSS start / peak / end MB | viewers that saw every point |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, p, e = r["rss"]
        where = "a core of its own" if r["pinned"] else "shared"
        print(
            f"| {r['db']} | {where}, {100 * r['cpu']:.0f}% busy | {r['rate']:,.0f} "
            f"| {pct(r['healthz'], 50):.1f} / "
            f"{pct(r['healthz'], 99):.1f} | {pct(r['jobs'], 50):.1f} / {pct(r['jobs'], 99):.1f} "
            f"| {r['errors']} | {r['in_use']:.0f} ({r['pool']:.0f}) | {s:.0f} / {p:.0f} / {e:.0f} "
            f"| {r['complete']} / {r['viewers']} |"
        )
    for r in results:
        mode = "a core of its own" if r["pinned"] else "shared"
        print(
            f"{r['db']}, {mode}: the service's threads waited for a CPU "
            f"{100 * r['waited']:.0f}% of the time; the hypervisor took {100 * r['stolen']:.0f}% "
            "of a CPU; CPU used, in CPUs: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["roles"].items()))
            + f"; points stored per job {json.dumps(r['points'])}; largest shortfalls of "
            f"a viewer {r['short']}"
        )
    print(
        "targets: p99 <= 100 ms for both probes, 0 x 5xx, connections <= pool, RSS growth "
        "<= 100 MB, every viewer sees every point"
    )


if __name__ == "__main__":
    main()
