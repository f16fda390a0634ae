"""Running the training loop: on Ray (a warm worker group, else Ray Train's TorchTrainer) or
in local processes.

Everything a run leaves is in its run directory: ``metrics.jsonl`` (one object per report,
with "step"), ``status.jsonl``, ``checkpoints/step-N/``, ``workers.jsonl`` (rank, pid,
host of each worker start) and ``result.json`` (status, final metrics, ``params_sha256``).

Importing this module does not import torch: a job's driver only connects to Ray and hands
the job to workers, and starts faster without it (the workers import it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import deaths, elastic
from .logs import capture
from .reporting import ConsoleReporter, Fanout, HttpReporter, JsonlReporter, Reporter
from .run_dir import RunDir
from .spec import TrainSpec

if TYPE_CHECKING:
    from .loop import Session


def make_reporter(
    run_dir: Path, console: bool = False, http: dict[str, Any] | None = None
) -> Reporter:
    """The JSON-lines file in ``run_dir``, plus the console and the service if asked.
    ``http``: {"api_url", "job_id", "token_file"} of the Nestor service."""
    reporters: list[Reporter] = [JsonlReporter(RunDir(run_dir).metrics)]
    if console:
        reporters.append(ConsoleReporter())
    if http:
        token = Path(http["token_file"]).read_text().strip()
        reporters.append(HttpReporter(http["api_url"], int(http["job_id"]), token))
    return Fanout(*reporters)


def _record_worker(run_dir: Path, rank: int, node: str | None = None) -> None:
    entry = {
        "rank": rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node": node,
        "time": time.time(),
    }
    with open(RunDir(run_dir).workers, "a") as f:
        f.write(json.dumps(entry) + "\n")


def run_worker(
    spec: TrainSpec,
    session: Session,
    console: bool = False,
    http: dict[str, Any] | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """What every worker runs once its process group exists: train, and on rank 0 write
    ``result.json``. A non-finite loss or a job whose code or data cannot train ends the run
    as failed, without retries (a restart would fail the same way); other errors propagate
    so that Ray can restart the group."""
    from .data import SetupError
    from .loop import NonFiniteLossError, train

    with capture(session.run_dir, f"rank {session.rank}"):
        _record_worker(session.run_dir, session.rank, node)
        error_file = RunDir(session.run_dir).error(session.rank)
        error_file.unlink(missing_ok=True)  # from an attempt before this one
        reporter = make_reporter(session.run_dir, console, http) if session.rank == 0 else None
        try:
            result = train(spec, session, reporter)
        except (NonFiniteLossError, SetupError) as e:
            result = {"status": "failed", "error": str(e)}
            if reporter:
                reporter.status("failed", error=str(e))
        except BaseException as e:
            trace = traceback.format_exc()
            print(trace, file=sys.stderr, flush=True)  # into the job's log
            if not isinstance(e, KeyboardInterrupt | SystemExit):
                error_file.write_text(trace)
            raise
        finally:
            for r in getattr(reporter, "reporters", ()):
                if hasattr(r, "close"):
                    r.close()
            if session.rank == 0:
                write_metrics_csv(session.run_dir)
        if session.rank == 0:
            write_result(session.run_dir, result)
        return result


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """Write ``run_dir/result.json`` atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).result
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, path)


def failure_summary(run_dir: Path, lines: int = 12) -> str | None:
    """The last lines of the traceback of the rank that failed first (the others usually
    fail after it, their peer gone), from ``error-rank{r}.txt``."""
    found = sorted(run_dir.glob(RunDir.ERRORS), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    rank = RunDir.error_rank(found[0])
    tail = found[0].read_text().rstrip().splitlines()[-lines:]
    return f"rank {rank} raised:\n" + "\n".join(tail)


def write_metrics_csv(run_dir: Path) -> None:
    """``metrics.csv``: ``metrics.jsonl`` as a table (step, time, then every key)."""
    source = RunDir(run_dir).metrics
    if not source.exists():
        return
    rows = []
    for line in source.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line
            continue
    keys = sorted({k for r in rows for k in r} - {"step", "time"})
    target = RunDir(run_dir).metrics_csv
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "time", *keys], restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------------- Ray
def connect_ray(address: str | None, timeout: float = 5.0, **init_kwargs: Any) -> None:
    """Connect this process to Ray, never waiting for ever on a cluster that is gone.

    ``None`` or ``"local"`` starts a private local Ray (never the cluster named in Ray's
    address file, which outlives the cluster it names); ``"auto"`` joins the cluster in
    RAY_ADDRESS or the one this machine started last; ``host:port`` joins that one. A
    cluster's address is first tried with a TCP connection (``timeout`` seconds), and an
    error names the address.
    """
    import ray

    if address in (None, "local"):
        ray.init(address="local", **init_kwargs)
        return
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        address = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
        if not address:
            raise ConnectionError("--ray-address auto: no Ray cluster was started on this machine")
    if "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None
    ray.init(address=address, **init_kwargs)


def _ray_train_fn(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: a thin wrapper around ``run_worker``."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from .loop import Session

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    run_config(
        config,
        Session(
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ray.train.torch.get_device(),
            Path(config["run_dir"]),
        ),
    )


def run_config(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train the job ``config`` describes (as Ray Train's train function and a warm worker
    get it: spec, run_dir, console, http) as ``session``'s rank, on a Ray worker."""
    import ray

    return run_worker(
        TrainSpec.model_validate(config["spec"]),
        session,
        config.get("console", False),
        config.get("http"),
        ray.get_runtime_context().get_node_id(),
    )


def run_on_ray(
    spec: TrainSpec,
    run_dir: str | os.PathLike[str],
    *,
    ray_address: str | None = None,
    max_failures: int = 3,
    cpus_per_worker: int = 1,
    console: bool = False,
    http: dict[str, Any] | None = None,
    placement_strategy: str = "PACK",
    runtime_env: dict[str, Any] | None = None,
    warm: bool = False,
) -> dict[str, Any]:
    """Train ``spec`` with Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU) and return
    ``result.json``. When a worker process dies, FailureConfig restarts the group and the
    loop resumes from the latest checkpoint in ``run_dir`` (which every node must reach).

    Uses the Ray cluster this process is connected to, else the one ``connect_ray``
    finds for ``ray_address`` (None: a private local Ray), with ``runtime_env`` (a code
    package as ``working_dir``, ``pip`` requirements) for every worker of this driver.

    ``warm``: train on a warm worker group of the cluster when one can be had (a CPU job
    placed with ``PACK``; see ``workers.pool``), falling back to Ray Train when it fails.
    """
    import ray

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        connect_ray(ray_address, log_to_driver=console, runtime_env=runtime_env)
    config = {
        "spec": spec.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "threads": cpus_per_worker,
        "console": console,
        "http": http,
    }
    if spec.elastic:
        return _elastic_on_ray(
            spec, run_dir, config, max_failures, cpus_per_worker, placement_strategy
        )
    if warm and not spec.use_gpu and placement_strategy == "PACK":
        from . import pool

        key = pool.pool_key(ray.get_runtime_context().runtime_env, cpus_per_worker)
        group = pool.claim(spec.num_workers, key)
        if group is not None:
            try:
                return _finished(run_dir, pool.run_warm(group, config))
            except Exception as e:
                # A worker died or raised: Ray Train takes over from the latest checkpoint,
                # as a restart of its own group would, with one attempt fewer.
                print(
                    f"warm worker group failed ({type(e).__name__}); restarting the "
                    "job's workers with Ray Train",
                    file=sys.stderr,
                    flush=True,
                )
                max_failures -= 1
                if max_failures < 0:
                    return _failed(run_dir, e)

    try:
        _fit(
            spec.num_workers,
            spec,
            run_dir,
            config,
            max_failures,
            cpus_per_worker,
            placement_strategy,
        )
    except Exception as e:  # Ray's TrainingFailedError: out of retries
        return _failed(run_dir, e)
    return json.loads(RunDir(run_dir).result.read_text())


def _fit(
    world: int,
    spec: TrainSpec,
    run_dir: Path,
    config: dict[str, Any],
    max_failures: int,
    cpus_per_worker: int,
    placement_strategy: str,
) -> None:
    """One Ray Train run of ``world`` workers; raises when it fails past ``max_failures``
    restarts of its own group."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        _ray_train_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    ).fit()


def _elastic_on_ray(
    spec: TrainSpec,
    run_dir: Path,
    config: dict[str, Any],
    max_failures: int,
    cpus_per_worker: int,
    placement_strategy: str,
) -> dict[str, Any]:
    """An elastic job as segments of fixed size (workers.elastic). A planned resize ends a
    segment at a step boundary with its checkpoint; a lost worker ends it with an error,
    and the next segment starts at the size the cluster can hold now (never above ``max``;
    below ``min`` it waits for Ray to place it) from the last complete checkpoint."""
    world = first_world(spec, run_dir)
    failures = 0
    while True:
        RunDir(run_dir).result.unlink(missing_ok=True)  # a resized segment's
        nodes = _alive_nodes()
        try:
            _fit(world, spec, run_dir, config, 0, cpus_per_worker, placement_strategy)
        except Exception as e:
            failures += 1
            if failures > max_failures:
                return _failed(run_dir, e)
            fits = min(spec.max_workers, max(_workers_that_fit(spec, cpus_per_worker), 1))
            after = _placeable(
                spec, max(fits, spec.min_workers), cpus_per_worker, placement_strategy
            )
            lost = "node lost" if _alive_nodes() < nodes or _node_gone(run_dir) else "worker lost"
            print(
                f"elastic: a segment on {world} workers failed ({lost}: {type(e).__name__}); "
                f"going on with {after} from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            elastic.write_resize(run_dir, after, lost)
            world = after
            continue
        result = json.loads(RunDir(run_dir).result.read_text())
        if result.get("status") != "resized":
            return result
        world = int(result["next_world_size"])


def _placeable(spec: TrainSpec, world: int, cpus_per_worker: int, strategy: str) -> int:
    """The most workers, from ``world`` down to the job's ``min``, that Ray can place now:
    each size is tried as a placement group, given ``PLACE_WAIT`` seconds. After a node
    is lost, Ray may count its resources until it notices the node is gone; a size it
    cannot place then is not waited for."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    while world > spec.min_workers:
        group = placement_group([bundle] * world, strategy=strategy)
        try:
            ray.get(group.ready(), timeout=PLACE_WAIT)
            return world
        except GetTimeoutError:
            world -= 1
        finally:
            remove_placement_group(group)
    return spec.min_workers  # Ray Train waits for these


PLACE_WAIT = 10.0  # seconds a size is given to be placed after a worker is lost


def _node_gone(run_dir: Path) -> bool:
    """Whether a node the failed segment's workers ran on is gone: dead to Ray, or its
    node manager no longer answering (Ray notices a killed node only after its health
    checks time out)."""
    import ray

    ran_on = {row.get("node") for row in worker_starts(run_dir).values()}
    for node in ray.nodes():
        if node.get("NodeID") not in ran_on:
            continue
        if not node.get("Alive"):
            return True
        try:
            address = (node["NodeManagerAddress"], int(node["NodeManagerPort"]))
            with socket.create_connection(address, timeout=2.0):
                pass
        except (OSError, KeyError, ValueError):
            return True
    return False


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _workers_that_fit(spec: TrainSpec, cpus_per_worker: int) -> int:
    """Workers the cluster's free resources hold now."""
    import ray

    free = ray.available_resources()
    n = int(free.get("CPU", 0) // max(cpus_per_worker, 1))
    if spec.use_gpu:
        n = min(n, int(free.get("GPU", 0)))
    return n


def _finished(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """result.json as rank 0 wrote it (``result`` when a failure did not reach it)."""
    path = RunDir(run_dir).result
    return json.loads(path.read_text()) if path.exists() else result


def _failed(run_dir: Path, e: BaseException) -> dict[str, Any]:
    """result.json for a job Ray gave up on: how its processes died first (a rank that Ray's
    memory monitor, the kernel's OOM killer or a signal killed: ``workers.deaths``), then
    the failing rank's traceback or Ray's error."""
    if not RunDir(run_dir).result.exists():
        detail = failure_summary(run_dir) or f"{type(e).__name__}: {e}"
        died = deaths.of_failure(e, worker_starts(run_dir), _session_dir())
        write_result(run_dir, {"status": "failed", "error": deaths.first(died, detail)})
    return json.loads(RunDir(run_dir).result.read_text())


def worker_starts(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Each rank's latest start in ``workers.jsonl`` (its row: pid, host, node, time)."""
    starts: dict[int, dict[str, Any]] = {}
    with contextlib.suppress(OSError):
        for line in RunDir(run_dir).workers.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                starts[int(row["rank"])] = row
    return starts


def _session_dir() -> str | None:
    """This Ray session's directory (where death records are kept), when connected."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_session_dir_path() if _global_node else None
    except Exception:  # not connected, or Ray moved it
        return None


# --------------------------------------------------------------------- local processes
class LocalDevicesError(ValueError):
    """The spec asks for devices this machine does not have (raised before any process
    starts)."""


def cuda_device_count() -> int:
    """The CUDA devices torch sees in this process (0 without a CUDA build or driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def on_this_machine(spec: TrainSpec, cuda_count: int) -> TrainSpec:
    """``nestor train --local``'s default: a spec that does not say ``use_gpu`` trains on the
    GPUs where torch sees any, one per worker, and on the CPU elsewhere; one that says it is
    taken at its word. (On Ray and in ``run_local`` the spec's ``use_gpu`` alone decides.)"""
    if "use_gpu" in spec.model_fields_set or cuda_count == 0:
        return spec
    return spec.model_copy(update={"use_gpu": True})


def local_devices(
    spec: TrainSpec, cuda_count: int, world: int | None = None
) -> tuple[str, list[str]]:
    """The process group backend and each rank's device for ``run_local``.

    ``use_gpu`` decides, as it does on Ray: one GPU per worker (``cuda:{rank}``) over NCCL,
    else the CPU over gloo. A spec without it trains on the CPU even where GPUs exist: the
    spec is the job's one contract, and what it trains with (its defaults for overlapping
    the all-gather, bf16 autocast's kernels) follows the device it names.
    """
    world = world or spec.min_workers
    if not spec.use_gpu:
        return "gloo", ["cpu"] * world
    if cuda_count == 0:
        raise LocalDevicesError(
            "use_gpu is true but torch sees no CUDA device here; set use_gpu to false to "
            "train on the CPU"
        )
    if world > cuda_count:
        raise LocalDevicesError(
            f"num_workers={world} but only {cuda_count} CUDA device"
            f"{'s are' if cuda_count != 1 else ' is'} visible (use_gpu: one GPU per worker); "
            "ask for fewer workers, or set use_gpu to false to train on the CPU"
        )
    return "nccl", [f"cuda:{rank}" for rank in range(world)]


def _local_worker(
    rank: int,
    world: int,
    spec_json: str,
    run_dir: str,
    init: str,
    code_dir: str | None,
    backend: str,
    devices: list[str],
) -> None:
    import torch
    import torch.distributed as dist

    from optimizers.zero.collectives import end_process_group

    from .loop import Session

    if code_dir:  # what Ray's working_dir does on a cluster: the project is importable
        sys.path.insert(0, code_dir)
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        session = Session(rank, world, device, Path(run_dir))
        run_worker(TrainSpec.model_validate_json(spec_json), session)
    except Exception:
        if rank == 0 and not RunDir(Path(run_dir)).result.exists():
            error = failure_summary(Path(run_dir)) or traceback.format_exc()
            write_result(Path(run_dir), {"status": "failed", "error": error})
        raise
    finally:
        end_process_group()


def run_local(
    spec: TrainSpec, run_dir: str | os.PathLike[str], code_dir: str | None = None
) -> dict[str, Any]:
    """Train in ``spec.num_workers`` local processes, without Ray: for tests, debugging and
    machines without Ray; ``code_dir``: the project the spec's factories are imported from.
    With ``use_gpu``, rank r trains on ``cuda:r`` over NCCL; else on the CPU over gloo
    (``local_devices``; a ``LocalDevicesError`` before any process starts when the GPUs are
    not there). Returns ``result.json``."""
    import torch.multiprocessing as mp

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    world = first_world(spec, run_dir)
    while True:
        backend, devices = local_devices(spec, cuda_device_count(), world)
        RunDir(run_dir).result.unlink(missing_ok=True)  # a resized segment's
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            args = (world, spec.model_dump_json(), str(run_dir), init, code_dir)
            with contextlib.suppress(mp.ProcessRaisedException):  # result.json says why
                mp.spawn(_local_worker, args=(*args, backend, devices), nprocs=world)
        result = json.loads(RunDir(run_dir).result.read_text())
        if result.get("status") != "resized":
            return result
        world = int(result["next_world_size"])


def first_world(spec: TrainSpec, run_dir: Path) -> int:
    """The size a job starts on: a fixed job's ``num_workers``; an elastic job's from
    ``resize.json`` (the service's choice, or a lost worker's), within its range, else
    its ``min``."""
    if not spec.elastic:
        return spec.num_workers
    asked = elastic.read_resize(run_dir)
    n = asked.num_workers if asked is not None else spec.min_workers
    return min(max(n, spec.min_workers), spec.max_workers)
