"""One scheduler per database: the lease on SQLite and PostgreSQL, and what a killed service
leaves behind (a lease: nothing; an embedded Ray: adopted, or stopped when it is dead)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.lease import LeaseHeld, acquire
from service.ray_cluster import RayCluster

HOLD = (
    "import sys, time\n"
    "from service.lease import acquire\n"
    "lease = acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_the_lease_names_its_holder_and_a_killed_holder_leaves_no_stale_lease(db_url):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, db_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld) as held:
            acquire(db_url)
        message = str(held.value)
        assert message.startswith("another Nestor scheduler holds this database: ")
        assert f"pid {holder.pid}, host {socket.gethostname()}" in message
        assert held.value.pid == holder.pid and held.value.host == socket.gethostname()
    finally:
        holder.kill()
        holder.wait()
    lease = acquire(db_url)  # SIGKILL freed it: no stale lease blocks the restart
    with pytest.raises(LeaseHeld):
        acquire(db_url)  # and it is held again, also within one process
    lease.release()
    acquire(db_url).release()


def test_an_unresponsive_embedded_ray_left_behind_is_stopped_not_adopted(tmp_path):
    """The state file names a `ray start` whose dashboard does not answer: the next start
    stops that process group instead of starting a second cluster beside it."""
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "ray", "start", "--block"],
        start_new_session=True,
    )
    cmdline = Path(f"/proc/{leftover.pid}/cmdline")
    while b"ray\0start" not in cmdline.read_bytes():  # until it has exec'd
        time.sleep(0.01)
    state = {
        "gcs_address": "127.0.0.1:1",
        "dashboard_url": "http://127.0.0.1:1",  # nothing answers there
        "pid": leftover.pid,
        "num_cpus": 2,
    }
    (tmp_path / "ray-cluster.json").write_text(json.dumps(state))
    cluster = RayCluster(None, tmp_path)
    assert cluster.adopt() is False
    assert leftover.wait(timeout=60) is not None
    assert not (tmp_path / "ray-cluster.json").exists()


def test_a_dead_pid_in_the_state_file_is_forgotten(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = {"gcs_address": "x:1", "dashboard_url": "http://127.0.0.1:1", "pid": gone.pid}
    (tmp_path / "ray-cluster.json").write_text(json.dumps(state))
    assert RayCluster(None, tmp_path).adopt() is False
    assert not (tmp_path / "ray-cluster.json").exists()


def test_a_busy_port_fails_before_anything_starts(tmp_path):
    from .conftest import ADMIN

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env={"NESTOR_HOME": str(tmp_path), "NESTOR_ADMIN_TOKEN": ADMIN, "PATH": "/usr/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "ray-cluster.json").exists()  # no Ray was started
    acquire(f"sqlite:///{tmp_path / 'nestor.db'}").release()  # and the lease was let go


def test_the_listening_socket_gives_connections_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets created as IPPROTO_TCP; without it every
    response of `nestor serve` waited ~40 ms for Nagle's algorithm and a delayed ACK."""
    import asyncio

    from service.cli.process import _listen

    sock = _listen("127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def accepted_nodelay() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                conn = transport.get_extra_info("socket")
                got.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(got, 10)
        writer.close()
        server.close()
        return value

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # the session's browser may hold a loop here
        assert pool.submit(asyncio.run, accepted_nodelay()).result() != 0
