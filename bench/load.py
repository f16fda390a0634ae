"""The service under load: many live job pages and a heavy metric ingest at once.

`nestor serve --api-only` on loopback (SQLite or a private PostgreSQL), a list of
``--jobs`` jobs (some with metrics), then, for ``--seconds``:

- ``--pages`` live job pages on the job that receives the ingest below, each doing what the
  dashboard's job page does: the job, its event history, one metrics request per chart
  (max_points=2000), its logs and artifacts, then its server-sent-event stream to the end,
  and the job again every 5 s (the page's refresh of the queue estimates);
- a steady ingest of ``--rate`` metric points per second into that job, sent in order in
  batches of 500 steps x 10 keys, as a job's reporter sends them;
- probes: ``GET /healthz`` and ``GET /v1/jobs?limit=100`` one after the other, every 50 ms;
- samples of ``/metrics`` (pooled database connections in use) and of the service's RSS.

At the end the job succeeds, every stream ends, and each page's count of points is compared
with the points stored. The service shares the machine's cores with the load generator
(pages, probes and ingest run in processes of their own, so the client's GIL does not add to
the latencies measured); ``--pin on`` gives the service a core of its own instead, and
``--training`` adds a job training on the service's embedded Ray (full `nestor serve`).
``--tree DIR`` runs another checkout's service the same way (before/after in one run).
Targets: /healthz p99 <= 50 ms, GET /v1/jobs p99 <= 100 ms, no 5xx, connections <= pool
size, RSS growth <= 100 MB, every page sees every point.

    python bench/load.py [--db sqlite|postgresql|both] [--pages 40] [--rate 50000]
                         [--tree DIR] [--pin off|on|both] [--training]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import os
import queue
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

# bench/service.py's helpers, loaded by path (its module name is taken).
_loader = importlib.util.spec_from_file_location("bench_service", Path(_HERE) / "service.py")
bench_service = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(bench_service)

TOKEN = "nst_bench_load_admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYS = [  # ten of the series a job reports, which the job page's charts draw
    "train_loss", "val_loss", "val_accuracy", "lr", "grad_norm", "samples_per_s",
    "tokens_per_s", "mfu", "tflops", "opt_state_bytes",
]  # fmt: skip
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
SEEDED = {**RUNNING, "max_steps": 100}


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
            elif "postgres" in cmd:
                role = "PostgreSQL"
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


# ------------------------------------------------------------------------- pages
CHART_KEYS = [  # the job page's charts (service/static/job.js), one metrics request each
    "train_loss,val_loss", "val_accuracy", "lr", "grad_norm", "samples_per_s,tokens_per_s",
    "mfu", "tflops", "eval_time_s", "opt_state_bytes_per_param", "opt_state_bytes", "step_time_s",
]  # fmt: skip


async def _stream(port: int, job_id: int, since: int) -> int:
    """Read the job's event stream after step ``since`` to its end; the points in it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(
        (
            f"GET /v1/jobs/{job_id}/events?since_step={since} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        return -int(head.split()[1])
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
    writer.close()
    return seen


async def _page(port: int, job_id: int, out: dict, index: int, loaded: asyncio.Event) -> None:
    """One open job page: its first requests (timed), then its stream, and the job again
    every 5 s until the stream ends."""
    import httpx

    base = f"/v1/jobs/{job_id}"
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60
    ) as http:
        t0 = time.perf_counter()
        first = [http.get(base), http.get(f"{base}/events/history"), http.get("/v1/me")]
        first += [
            http.get(f"{base}/metrics", params={"keys": keys, "max_points": 2000})
            for keys in CHART_KEYS
        ]
        first += [http.get(f"{base}/logs", params={"limit": 200}), http.get(f"{base}/artifacts")]
        answers = await asyncio.gather(*first)
        took = time.perf_counter() - t0
        loaded.set()
        errors = sum(r.status_code >= 500 for r in answers)
        # As the page does: stream from the earliest of the last steps its charts drew.
        lasts = [
            series["step"][-1]
            for r in answers[3 : 3 + len(CHART_KEYS)]
            if r.status_code == 200
            for series in r.json()["series"].values()
            if series["step"]
        ]
        since = min(lasts, default=0)
        stream = asyncio.create_task(_stream(port, job_id, since))
        while not stream.done():
            await asyncio.wait([stream], timeout=5.0)
            if not stream.done():
                errors += (await http.get(base)).status_code >= 500
        out[index] = (stream.result(), took, errors, since)


def pages_process(port: int, plan: list[int], out: mp.Queue, ready: mp.Event) -> None:
    """The pages, opened one every 100 ms (as a team opens them, not all in one instant);
    ``ready`` once every page has loaded."""

    async def run() -> dict:
        results: dict = {}
        tasks, loaded = [], []
        for i, job_id in enumerate(plan):
            loaded.append(asyncio.Event())
            tasks.append(asyncio.create_task(_page(port, job_id, results, i, loaded[-1])))
            await asyncio.sleep(0.1)
        for event in loaded:
            await event.wait()
        ready.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return results

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
                try:
                    failed = http.get(path).status_code >= 500
                except httpx.HTTPError:  # no answer within 30 s: counted, and timed as such
                    failed = True
                lat[name].append((time.perf_counter() - t0) * 1000)
                errors += failed
            time.sleep(0.05)
    out.put((lat, errors))


# ------------------------------------------------------------------------- ingest
def ingest_process(
    url: str, job_id: int, rate: int, seconds: float, after: int, out: mp.Queue
) -> None:
    """Batches of 500 steps x 10 keys in order, paced to ``rate`` points per second."""
    per_batch = STEPS_PER_BATCH * len(KEYS)
    interval = per_batch / rate
    sent = errors = 0
    step = after
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
            try:
                r = http.post(f"/v1/jobs/{job_id}/ingest", json={"points": points})
                if r.status_code == 200:
                    sent += r.json()["accepted"]
                errors += r.status_code >= 500
            except httpx.HTTPError:
                errors += 1
            n += 1
            pause = start + n * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        elapsed = time.perf_counter() - start
    out.put((sent, elapsed, errors))


# ------------------------------------------------------------------------- one run
def stored_points(db_url: str, job_id: int, after: int) -> int:
    """The job's points stored with a step after ``after``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(
            text("SELECT count(*) FROM metrics WHERE job_id = :j AND step > :s"),
            {"j": job_id, "s": after},
        )
        count = n.scalar()
    engine.dispose()
    return int(count)


def send_history(http: httpx.Client, job_id: int, steps: int) -> int:
    """``steps`` steps of the ingest's 10 keys, as the job's earlier history; the last step."""
    for first in range(1, steps + 1, 1000):
        points = [
            {"step": st, "time": 0.0, "values": {k: st * 1e-6 + j for j, k in enumerate(KEYS)}}
            for st in range(first, min(steps, first + 999) + 1)
        ]
        body = {"points": points, **({"status": "running"} if first == 1 else {})}
        http.post(f"/v1/jobs/{job_id}/ingest", json=body).raise_for_status()
    return steps


def seed_jobs(http: httpx.Client, count: int) -> None:
    """A team's job list: ``count`` finished jobs, each with a short loss curve."""
    for i in range(count):
        job = http.post("/v1/jobs", json={"name": f"job-{i}", "spec": SEEDED}).json()
        points = [
            {"step": st, "values": {"train_loss": 1 / st, "val_accuracy": 0.5}}
            for st in range(1, 101)
        ]
        http.post(
            f"/v1/jobs/{job['id']}/ingest", json={"points": points, "status": "running"}
        ).raise_for_status()
        http.post(f"/v1/jobs/{job['id']}/ingest", json={"status": "succeeded"}).raise_for_status()


def run(db: str, pinned: bool, tree: Path, args: argparse.Namespace) -> dict:
    from tests.postgres import postgres_server

    ctx = mp.get_context("spawn")
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nestor-load-")))
        db_url = (
            stack.enter_context(postgres_server())
            if db == "postgresql"
            else f"sqlite:///{home / 'nestor.db'}"
        )
        port = bench_service.free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(tree),
            "NESTOR_HOME": str(home),
            "NESTOR_PORT": str(port),
            "NESTOR_ADMIN_TOKEN": TOKEN,
            "NESTOR_DATABASE_URL": db_url,
            # All pages share the admin token here; the default limit is 32 per token.
            "NESTOR_MAX_STREAMS_PER_TOKEN": str(args.pages + 10),
        }
        log = open(home / "serve.log", "wb")  # noqa: SIM115
        serve = [sys.executable, "-m", "service.cli", "serve"]
        server = subprocess.Popen(
            serve if args.training else [*serve, "--api-only"],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=log,
        )
        stack.callback(lambda: (server.terminate(), server.wait(timeout=120)))
        if args.training:
            stack.callback(
                lambda: subprocess.run(
                    [sys.executable, "-m", "service.cli", "stop"],
                    cwd=tree,
                    env=env,
                    capture_output=True,
                    timeout=180,
                )
            )
        http = stack.enter_context(httpx.Client(base_url=url, headers=AUTH, timeout=60))
        for _ in range(600):
            try:
                if http.get("/healthz").is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        running = None
        if args.training:  # first: it takes the cluster, so the jobs below never start
            running = http.post("/v1/jobs", json={"name": "running", "spec": RUNNING}).json()
            while http.get(f"/v1/jobs/{running['id']}").json()["last_step"] < 10:
                time.sleep(0.5)
        seed_jobs(http, args.jobs - 1)
        watched = http.post("/v1/jobs", json={"name": "watched", "spec": RECEIVING}).json()
        t = time.time()
        after = send_history(http, watched["id"], args.history)
        print(
            f"{db}: {args.jobs} jobs; the watched one has {args.history * len(KEYS):,} points "
            f"({time.time() - t:.0f} s to send)",
            file=sys.stderr,
            flush=True,
        )
        if pinned:
            pin_service(server.pid)
        rss_start = rss_mb(server.pid)

        plan = [watched["id"]] * args.pages
        views, probes, ingest = ctx.Queue(), ctx.Queue(), ctx.Queue()
        ready = ctx.Event()
        pages_proc = ctx.Process(target=pages_process, args=(port, plan, views, ready))
        pages_proc.start()
        ready.wait(timeout=300)
        procs = [
            ctx.Process(target=probes_process, args=(url, args.seconds, probes)),
            ctx.Process(
                target=ingest_process,
                args=(url, watched["id"], args.rate, args.seconds, after, ingest),
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
        pool = float("nan")
        while time.time() < deadline:
            try:
                text = http.get("/metrics").text
            except httpx.HTTPError:  # no answer: the probes count it
                text = ""
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
        with suppress(httpx.HTTPError):
            http.post(f"/v1/jobs/{watched['id']}/ingest", json={"status": "succeeded"})
        if running:
            http.post(f"/v1/jobs/{running['id']}/cancel")
        try:
            pages = views.get(timeout=300)
        except queue.Empty:  # pages that never finished
            pages = {}
        pages_proc.join()
        counts = [pages.get(i, (0, float("nan"), 0, 0)) for i in range(len(plan))]
        want = [stored_points(db_url, watched["id"], c[3]) for c in counts]
        total = stored_points(db_url, watched["id"], 0)
    return {
        "db": db,
        "tree": tree,
        "pinned": pinned,
        "cpu": cpu,
        "waited": waited,
        "roles": roles,
        "stolen": stolen,
        "rate": sent / elapsed,
        "healthz": lat["healthz"],
        "jobs": lat["jobs"],
        "loads": [c[1] * 1000 for c in counts],
        "errors": probe_errors + ingest_errors + sum(c[2] for c in counts),
        "in_use": max(in_use or [0.0]),
        "pool": pool,
        "rss": (rss_start, rss_peak, rss_end),
        "complete": sum(c[0] == w for c, w in zip(counts, want, strict=True)),
        "pages": len(plan),
        "short": sorted(w - c[0] for c, w in zip(counts, want, strict=True))[-3:],
        "points": total,
    }


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pages", type=int, default=40, help="live job pages")
    parser.add_argument("--jobs", type=int, default=60, help="jobs in the list")
    parser.add_argument("--history", type=int, default=100_000, help="steps before the pages")
    parser.add_argument("--rate", type=int, default=50_000, help="points per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument(
        "--pin",
        choices=["both", "on", "off"],
        default="off",
        help="on: the service on a core of its own, everything else on the others",
    )
    parser.add_argument("--training", action="store_true", help="a job training beside")
    bench_service.add_tree_option(parser)
    args = parser.parse_args()
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    pins = {"both": [False, True], "on": [True], "off": [False]}[args.pin]
    if (os.cpu_count() or 1) < 2:
        pins = [False]
    everywhere = os.sched_getaffinity(0)
    results = []
    for pinned in pins:
        for db in dbs:
            for tree in [Path(_ROOT), *args.tree]:
                results.append(run(db, pinned, tree, args))
                set_affinity(os.getpid(), everywhere)  # pinning moved this process too
    print(
        f"`nestor serve{'' if args.training else ' --api-only'}` on loopback, "
        f"{os.cpu_count()} CPUs; {args.jobs} jobs in the list; {args.pages} live job pages on a "
        f"job with {args.history * len(KEYS):,} points that receives {args.rate:,} more a "
        "second (batches of 500 steps x 10 keys); probes every 50 ms; "
        f"{args.seconds:.0f} s" + ("; a digits-mlp job training beside" if args.training else "")
    )
    print(
        "| build | database | service's CPU | ingest points/s | /healthz p50 / p99 ms "
        "| GET /v1/jobs p50 / p99 ms | page's first requests p50 / p99 ms | 5xx "
        "| DB connections in use, max (pool) | RSS start / peak / end MB "
        "| pages that saw every point |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, p, e = r["rss"]
        where = "a core of its own" if r["pinned"] else "shared"
        print(
            f"| {bench_service.rev(r['tree'])} | {r['db']} | {where}, {100 * r['cpu']:.0f}% busy "
            f"| {r['rate']:,.0f} | {pct(r['healthz'], 50):.1f} / {pct(r['healthz'], 99):.1f} "
            f"| {pct(r['jobs'], 50):.1f} / {pct(r['jobs'], 99):.1f} "
            f"| {pct(r['loads'], 50):.0f} / {pct(r['loads'], 99):.0f} "
            f"| {r['errors']} | {r['in_use']:.0f} ({r['pool']:.0f}) | {s:.0f} / {p:.0f} / {e:.0f} "
            f"| {r['complete']} / {r['pages']} |"
        )
    for r in results:
        mode = "a core of its own" if r["pinned"] else "shared"
        build = bench_service.rev(r["tree"])
        print(
            f"{build}, {r['db']}, {mode}: the service's threads waited for a CPU "
            f"{100 * r['waited']:.0f}% of the time; the hypervisor took {100 * r['stolen']:.0f}% "
            "of a CPU; CPU used, in CPUs: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["roles"].items()))
            + f"; points stored {r['points']:,}; largest shortfalls of a page {r['short']}"
        )
    print(
        "targets: /healthz p99 <= 50 ms, GET /v1/jobs p99 <= 100 ms, 0 x 5xx, connections <= "
        "pool, RSS growth <= 100 MB, every page sees every point"
    )


if __name__ == "__main__":
    main()
