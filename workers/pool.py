"""Warm worker groups: Ray actors that keep torch and the training loop imported between jobs.

Ray Train builds a new worker group for every job: a controller actor, one actor per worker,
each a fresh process that imports torch and the loop, then a process group. On a small
machine that is most of a short job's start-up (README, "Start-up"). A warm worker is a
detached Ray actor that has done the imports once and then trains job after job:

- **Keyed by what a job's processes must share**: the job's runtime environment (its code
  package, pip requirements, environment variables) and the CPUs per worker. Up to
  ``NESTOR_WARM_WORKERS`` actors per key (default 4); a worker that stays idle for
  ``NESTOR_WARM_IDLE_SECONDS`` seconds (default 600) exits and frees its memory.
- **Claimed, not shared**: a driver claims idle actors one by one (``claim`` is atomic in
  the actor), creates missing ones, pings them every ``HEARTBEAT_S`` while it holds them and
  releases them when its job ends. A claimed actor whose driver stops pinging for
  ``LEASE_S`` (the driver was killed: a cancelled job) exits, taking the job's training
  with it, as Ray Train's workers die with their controller.
- **No state carried**: each job gets a new process group (a new rendezvous port) and builds
  its model, optimizer, data and RNG state from its spec as a new process would; the
  process-wide settings a job may change (torch's global RNG, default dtype, threads,
  deterministic mode, anomaly detection, the modules of its code package) are put back
  afterwards.
- **Failure falls back to Ray Train**: when any worker of a warm group fails or dies (a
  kill -9, an exception), the driver kills the whole group (never reused after a failure)
  and runs the job with Ray Train's TorchTrainer, one attempt fewer, which resumes from the
  job's latest checkpoint exactly as a restart of Ray Train's own group does.

Placement: warm actors reserve no CPUs (``num_cpus=0``; the service's scheduler admits jobs
by their CPU demand, not Ray) and are placed by Ray's default policy, so warm groups serve
jobs that ask for ``PACK`` placement on CPUs. GPU jobs and other placements use Ray Train,
whose placement groups hold the devices.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .settings import WorkerSettings

NAMESPACE = "nestor-warm"
HEARTBEAT_S = 2.0
LEASE_S = 30.0


def pool_key(runtime_env: dict[str, Any] | None, cpus_per_worker: int) -> str:
    """Jobs whose processes may be reused for each other: the same runtime environment and
    CPUs per worker (and the same Python, so one cluster can host two Nestor versions)."""
    blob = json.dumps(
        {"env": runtime_env or {}, "cpus": cpus_per_worker, "python": sys.executable},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class WarmWorker:
    """One warm worker process (a detached Ray actor; see the module's docstring)."""

    def __init__(self, idle_s: float) -> None:
        import torch  # the point of a warm worker: these imports are done once

        from . import launcher, loop  # noqa: F401

        self._torch = torch
        self._lock = threading.Lock()
        self._holder: str | None = None
        self._last_seen = time.monotonic()
        self._idle_s = idle_s
        # A job's code package is the actor's working directory (Ray unpacks it there).
        import ray

        env = ray.get_runtime_context().runtime_env
        self._code_dir = os.getcwd() if env.get("working_dir") else None
        self._defaults = {
            "seed": torch.initial_seed(),  # a new process's: fixed, so code that draws
            "dtype": torch.get_default_dtype(),  # before seeding is still reproducible
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "anomaly": torch.is_anomaly_enabled(),
        }
        threading.Thread(target=self._watch, name="warm-worker-watch", daemon=True).start()

    # -------------------------------------------------------------------- the lease
    def claim(self, holder: str) -> bool:
        with self._lock:
            if self._holder is not None:
                return False
            self._holder, self._last_seen = holder, time.monotonic()
            return True

    def ping(self, holder: str) -> bool:
        with self._lock:
            if self._holder != holder:
                return False
            self._last_seen = time.monotonic()
            return True

    def release(self, holder: str) -> None:
        with self._lock:
            if self._holder == holder:
                self._holder, self._last_seen = None, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                quiet = time.monotonic() - self._last_seen
                if self._holder is not None and quiet > LEASE_S:
                    # The driver is gone (killed: the job was cancelled or its driver
                    # crashed). Its training must not go on here: exit, as Ray Train's
                    # workers die with their controller.
                    os._exit(1)
                if self._holder is None and quiet > self._idle_s:
                    os._exit(0)

    # -------------------------------------------------------------------- a job
    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0's process group store."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def run(
        self, holder: str, rank: int, world: int, master: tuple[str, int], config: dict[str, Any]
    ) -> dict[str, Any]:
        """Train one job as ``rank`` of ``world`` (``config`` as Ray Train's train function
        gets it), then leave this process as a new one would be."""
        import torch.distributed as dist

        from .launcher import run_config
        from .loop import Session

        if self._holder != holder:
            raise RuntimeError("this warm worker is not held by the caller")
        torch = self._torch
        torch.set_num_threads(config["threads"])
        modules = set(sys.modules)
        path = list(sys.path)
        dist.init_process_group(
            "gloo", init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=world
        )
        try:
            return run_config(
                config, Session(rank, world, torch.device("cpu"), Path(config["run_dir"]))
            )
        finally:
            dist.destroy_process_group()
            self._reset(modules, path)

    def _reset(self, modules: set[str], path: list[str]) -> None:
        """Undo what a job may have changed in the process (its objects are garbage)."""
        torch = self._torch
        torch.manual_seed(self._defaults["seed"])
        torch.set_default_dtype(self._defaults["dtype"])
        torch.use_deterministic_algorithms(self._defaults["deterministic"])
        torch.autograd.set_detect_anomaly(self._defaults["anomaly"])
        if self._code_dir:  # the job's own modules: imported afresh by the next job
            for name in set(sys.modules) - modules:
                origin = getattr(sys.modules.get(name), "__file__", None) or ""
                if origin.startswith(self._code_dir + os.sep):
                    sys.modules.pop(name, None)
        sys.path[:] = path
        gc.collect()


class Group:
    """A driver's hold on ``n`` warm workers (claimed in rank order) while its job runs."""

    def __init__(self, actors: list[Any], holder: str) -> None:
        self.actors, self.holder = actors, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="warm-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for a in self.actors:
                a.ping.remote(self.holder)

    def release(self) -> None:
        """Give the workers back, and wait until they are: calls to a threaded actor are not
        ordered, so a job that follows at once could find them still held."""
        import ray

        self._stop.set()
        for answer in [a.release.remote(self.holder) for a in self.actors]:
            with contextlib.suppress(ray.exceptions.RayError):  # gone: nothing to give back
                ray.get(answer, timeout=60)

    def kill(self) -> None:
        import ray

        self._stop.set()
        for a in self.actors:
            ray.kill(a, no_restart=True)


def claim(n: int, key: str) -> Group | None:
    """Claim ``n`` warm workers of ``key``'s pool, creating the missing ones; None when the
    pool has fewer than ``n`` free places."""
    import ray

    actor_class = ray.remote(WarmWorker)
    options = {
        "num_cpus": 0,
        "max_concurrency": 4,  # run, and the lease calls beside it
        "lifetime": "detached",
        "namespace": NAMESPACE,
        "max_restarts": 0,
        "get_if_exists": True,
    }
    holder = uuid.uuid4().hex
    held: list[Any] = []
    settings = WorkerSettings.from_env()
    places = iter(range(settings.warm_workers))
    while len(held) < n:
        # Ask as many places as are still missing at once: new actors start in parallel.
        batch = [
            actor_class.options(name=f"warm-{key}-{i}", **options).remote(
                settings.warm_idle_seconds
            )
            for i in [next(places, None) for _ in range(n - len(held))]
            if i is not None
        ]
        if not batch:
            break
        for actor, answer in zip(batch, [a.claim.remote(holder) for a in batch], strict=True):
            try:
                if ray.get(answer, timeout=120):
                    held.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # exiting (idle) or not starting: another place
    group = Group(held, holder)
    if len(held) < n:
        group.release()
        return None
    return group


class WarmGroupError(RuntimeError):
    """Workers of a warm group failed: each failing rank's exception, as Ray Train's
    ``WorkerGroupError`` gives them (``worker_failures``)."""

    def __init__(self, worker_failures: dict[int, BaseException]) -> None:
        self.worker_failures = worker_failures
        super().__init__(
            "\n".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in worker_failures.items())
        )


FAILURE_GRACE_S = 3.0  # after a rank fails, how long the others have to say how they ended


def run_warm(group: Group, config: dict[str, Any]) -> dict[str, Any]:
    """Train on a claimed group; raises ``WarmGroupError`` when any worker fails (the group
    is then killed), with the failures of every rank that ended within ``FAILURE_GRACE_S``
    of the first: a rank killed by a signal often takes its peers' collectives down with it,
    and whichever Ray reports first need not be the cause."""
    import ray

    def on_term(signum: int, frame: Any) -> None:  # `ray job stop`: a cancelled job
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        master = ray.get(group.actors[0].rendezvous.remote())
        world = len(group.actors)
        refs = [
            a.run.remote(group.holder, r, world, master, config) for r, a in enumerate(group.actors)
        ]
        pending = list(refs)
        failures: dict[int, BaseException] = {}  # by rank
        result: dict[str, Any] | None = None
        while pending and not failures:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    value = ray.get(ref)  # a worker's exception or death raises here
                except ray.exceptions.RayError as e:
                    failures[refs.index(ref)] = e
                    continue
                if ref == refs[0]:
                    result = value
        if failures:
            done = []
            if pending:
                done, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    failures[refs.index(ref)] = e
            raise WarmGroupError(dict(sorted(failures.items())))
        group.release()
        assert result is not None
        return result
    except BaseException:
        group.kill()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
