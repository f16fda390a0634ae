"""The Ray cluster the service schedules onto: an existing one, or a local one it starts.

The embedded cluster is `ray start --head` on loopback with the dashboard (for the Jobs
API), with Ray's token authentication on: the token is made once and kept in
``HOME/ray-auth-token`` (mode 0600); every process of the cluster (GCS, raylet, dashboard, job
drivers, Train workers) inherits it from `ray start`'s environment, and the service sends it
with each call. Without it, Ray's Jobs API answers 401 and its gRPC ports refuse the caller.

The embedded cluster keeps its files in a temporary directory of its own (``temp_dir``), not
Ray's shared ``/tmp/ray``: a Ray job's driver joins "the cluster this machine started last"
as named there (Ray's job supervisor resolves the driver's ``RAY_ADDRESS`` from it), so with
a second Ray on the machine (a `nestor train`, a test suite) the service's next jobs would
start on that one instead.

The embedded cluster outlives the service while jobs run on it: its addresses and process
are recorded in ``HOME/ray-cluster.json``, and the next start adopts it when it answers, or
stops what is left of it when it does not, so there is never a second one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import settings as worker_settings

log = logging.getLogger("nestor.ray")
STATE_FILE = "ray-cluster.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """Where jobs go: ``gcs_address`` for resources, ``dashboard_url`` for the Jobs API.

    ``RayCluster(None, home)`` starts a local head node (``start()``) and stops exactly that
    one (``stop()``: the `ray start --block` process group it owns), never other clusters.
    An address names an existing cluster: a GCS address (host:port, dashboard assumed on
    8265) or the dashboard URL (http://host:port, GCS assumed on 6379).
    """

    def __init__(
        self, address: str | None, home: Path, num_cpus: int | None = None, auth: bool = True
    ) -> None:
        self.embedded = address is None
        # The embedded cluster's Ray token; an external cluster's from RAY_AUTH_TOKEN, if any.
        self.token = ray_token(home) if self.embedded and auth else os.environ.get("RAY_AUTH_TOKEN")
        self.auth = auth
        self.home = home
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.adopted = False  # an embedded cluster a previous service left running
        self._proc: subprocess.Popen | None = None
        self._head_pid: int | None = None  # `ray start` of the head; its process group
        self._nodes: list[tuple[subprocess.Popen, int]] = []  # extra worker nodes
        if address is None:
            self.gcs_address, self.dashboard_url = "", ""
        elif address.startswith("http"):
            self.dashboard_url = address.rstrip("/")
            self.gcs_address = address.split("//", 1)[1].rsplit(":", 1)[0] + ":6379"
        else:
            self.gcs_address = address
            self.dashboard_url = f"http://{address.rsplit(':', 1)[0]}:8265"

    @property
    def state_file(self) -> Path:
        return self.home / STATE_FILE

    @property
    def temp_dir(self) -> Path:
        """The embedded cluster's own Ray temporary directory, one per home. Short and under
        the system's temporary directory: Ray's socket paths inside it are limited to 107
        bytes, and a home may be deep."""
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"nestor-ray-{digest}"

    @property
    def headers(self) -> dict[str, str]:
        """What a call to the cluster's dashboard (Jobs and state APIs) must carry."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def env(self) -> dict[str, str]:
        """`ray start`'s environment, which every process of the cluster inherits: the
        service's own settings (an admin token, a database URL) stay with the service."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("NESTOR_") or k in worker_settings.VARIABLES
        }
        env.pop("RAY_ADDRESS", None)  # addresses are passed explicitly
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if self.embedded and self.token:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN"] = self.token
        elif self.embedded:
            env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster
        return env

    def _ray_start(self, args: list[str], log_name: str) -> subprocess.Popen:
        """`ray start ARGS --block` in its own process group, output to HOME/log_name."""
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / log_name, "ab")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(
            [
                ray,
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                # Ray's job agent listens on 52365 unless told otherwise: a second cluster
                # on the machine (another service, another node) would find it taken,
                # and its head would answer every job submission with "no available agent".
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )

    def start(self) -> None:
        """Adopt the embedded cluster a previous service left running, or start one."""
        if not self.embedded or self._head_pid is not None:
            return
        if self.adopt():
            return
        gcs, dash = free_port(), free_port()
        self._proc = self._ray_start(
            [
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--num-cpus={self.num_cpus}",
            ],
            "ray-head.log",
        )
        self._head_pid = self._proc.pid
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self._wait_for_dashboard()
        self._wait_for_cpus(self.num_cpus)
        state = {
            "gcs_address": self.gcs_address,
            "dashboard_url": self.dashboard_url,
            "pid": self._head_pid,
            "num_cpus": self.num_cpus,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    def adopt(self) -> bool:
        """Reuse the cluster recorded in the state file if it answers; otherwise stop what
        is left of it. Called with the scheduler lease held, so nobody else uses it."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        pid = int(state.get("pid") or 0)
        if _is_ray_start(pid) and _answers(state.get("dashboard_url", ""), self.headers):
            self.gcs_address, self.dashboard_url = state["gcs_address"], state["dashboard_url"]
            self.num_cpus = int(state.get("num_cpus") or self.num_cpus)
            self._head_pid, self.adopted = pid, True
            log.info("adopted the embedded Ray cluster left running at %s", self.gcs_address)
            return True
        if _is_ray_start(pid):
            log.warning("stopping an unresponsive embedded Ray cluster left behind (pid %s)", pid)
            _stop_group(pid)
        self.state_file.unlink(missing_ok=True)
        return False

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.home / 'ray-head.log'})")
            if _answers(self.dashboard_url, self.headers):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Ray dashboard at {self.dashboard_url} did not come up")

    def _wait_for_cpus(self, cpus: float, timeout: float = 60) -> None:
        """Until Ray's state API counts ``cpus`` on alive nodes (a node answers before it
        has registered its resources)."""
        deadline = time.time() + timeout
        while self._alive_resources().get("CPU", 0.0) < cpus:
            if time.time() > deadline:
                raise RuntimeError(f"Ray at {self.dashboard_url} did not report {cpus} CPUs")
            time.sleep(0.5)

    def add_node(self, num_cpus: int) -> None:
        """Start one more node (a separate `ray start` process) joined to this head: a
        multi-node cluster on one machine, for tests."""
        proc = self._ray_start(
            [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"], "ray-node.log"
        )
        self._nodes.append((proc, num_cpus))
        self._wait_for_cpus(self.num_cpus + sum(n for _, n in self._nodes))

    def kill_node(self) -> None:
        """Kill the node added last, at once (SIGKILL to its whole process group, no
        drain): a node lost, as when a spot VM is taken back. For tests."""
        proc, _ = self._nodes.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self, drain: float = 60) -> None:
        """Stop the nodes this object started or adopted (each one's whole process group),
        giving each up to ``drain`` seconds to stop its own processes first."""
        for proc, _ in self._nodes:
            _stop_group(proc.pid, proc, drain)
        if self._head_pid is not None:
            _stop_group(self._head_pid, self._proc, drain)
            if self.embedded:
                self.state_file.unlink(missing_ok=True)
        self._proc, self._head_pid, self._nodes = None, None, []

    def resources(self) -> dict[str, float]:
        """CPUs and GPUs of the cluster's alive nodes, from Ray's state API (no Ray driver in
        the service). An embedded cluster that is not running counts what it would start."""
        if not self.dashboard_url or (self.embedded and self._head_pid is None):
            return {"CPU": float(self.num_cpus + sum(n for _, n in self._nodes)), "GPU": 0.0}
        return self._alive_resources()

    def _alive_resources(self) -> dict[str, float]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(
            address=self.dashboard_url,
            headers={**self.headers, "Content-Type": "application/json"},
        )
        nodes = client.list(
            StateResource.NODES,
            options=ListApiOptions(filters=[("state", "=", "ALIVE")], timeout=10),
            raise_on_missing_output=False,
        )
        total = {"CPU": 0.0, "GPU": 0.0}
        for node in nodes:
            for key in total:
                total[key] += float(node.resources_total.get(key, 0))
        return total


def ray_token(home: Path) -> str:
    """The embedded cluster's Ray token, made on first use (``HOME/ray-auth-token``, 0600)."""
    path = home / "ray-auth-token"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _answers(dashboard_url: str, headers: dict[str, str], timeout: float = 2.0) -> bool:
    """Whether the dashboard answers this caller (a cluster with another token: 403, no)."""
    import urllib.request

    if not dashboard_url:
        return False
    try:
        request = urllib.request.Request(f"{dashboard_url}/api/version", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except OSError:
        return False


def _is_ray_start(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a `ray start` process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # somebody else's process: not ours to adopt or stop
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"ray" in cmdline and b"start" in cmdline


def _stop_group(pid: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """SIGTERM to `ray start` alone: it drains the node and stops its own processes in order
    (signalling the whole group killed the GCS first, and the drain then waited 30 s for it).
    Whatever is left of the group afterwards is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                break
        elif not _is_ray_start(pid):
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
