"""The Ray cluster the service schedules onto: an existing one, or a local one it starts.

The embedded cluster is `ray start --head` on loopback with the dashboard (for the Jobs
API). Ray 2.60 enables token authentication for local clusters; the embedded cluster runs
with RAY_AUTH_MODE=disabled because it listens on 127.0.0.1 only, and says so in the docs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


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

    def __init__(self, address: str | None, home: Path, num_cpus: int | None = None) -> None:
        self.embedded = address is None
        self.home = home
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self._proc: subprocess.Popen | None = None
        self._nodes: list[tuple[subprocess.Popen, int]] = []  # extra worker nodes
        if address is None:
            self.gcs_address, self.dashboard_url = "", ""
        elif address.startswith("http"):
            self.dashboard_url = address.rstrip("/")
            self.gcs_address = address.split("//", 1)[1].rsplit(":", 1)[0] + ":6379"
        else:
            self.gcs_address = address
            self.dashboard_url = f"http://{address.rsplit(':', 1)[0]}:8265"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.embedded:
            env["RAY_AUTH_MODE"] = "disabled"  # loopback only
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
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )

    def start(self) -> None:
        if not self.embedded or self._proc is not None:
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
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self._wait_for_dashboard()

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.home / 'ray-head.log'})")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Ray dashboard at {self.dashboard_url} did not come up")

    def add_node(self, num_cpus: int) -> None:
        """Start one more node (a separate `ray start` process) joined to this head: a
        multi-node cluster on one machine, for tests."""
        proc = self._ray_start(
            [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"], "ray-node.log"
        )
        self._nodes.append((proc, num_cpus))

    def stop(self) -> None:
        """Stop the nodes this object started (each one's whole process group)."""
        for proc, _ in [*self._nodes, (self._proc, 0)]:
            if proc is None:
                continue
            # SIGTERM to `ray start` alone: it drains the node and stops its own processes in
            # order. Signalling the whole group killed the GCS first, and the drain then waited
            # 30 s for it. Whatever is left of the group after that is killed.
            try:
                proc.terminate()
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._proc, self._nodes = None, []

    def total_cpus(self) -> float:
        """CPUs in the cluster."""
        if self.embedded:
            return float(self.num_cpus + sum(n for _, n in self._nodes))
        import ray

        if not ray.is_initialized():
            ray.init(address=self.gcs_address, log_to_driver=False)
        return float(ray.cluster_resources().get("CPU", 0))
