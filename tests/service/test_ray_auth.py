"""Ray's own door: the embedded cluster `nestor serve` starts runs with Ray's token
authentication, the service holds the token, and nobody without it submits a Ray job."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import httpx
import pytest

from service.ray_cluster import RayCluster
from service.ray_jobs import RayJobs


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-auth")
    cluster = RayCluster(None, home, num_cpus=1)
    cluster.start()
    yield cluster, home
    cluster.stop(drain=5)


def test_the_embedded_cluster_refuses_jobs_without_the_services_ray_token(guarded):
    cluster, home = guarded
    token_file = home / "ray-auth-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert cluster.token == token_file.read_text().strip() and len(cluster.token) == 64
    url = cluster.dashboard_url
    mode = httpx.get(f"{url}/api/authentication_mode", timeout=10).json()
    assert mode["authentication_mode"] == "token"

    intruder = {"entrypoint": "echo owned", "submission_id": "intruder"}
    assert httpx.post(f"{url}/api/jobs/", json=intruder, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert (
        httpx.post(f"{url}/api/jobs/", json=intruder, headers=wrong, timeout=10).status_code == 403
    )
    assert httpx.get(f"{url}/api/jobs/", timeout=10).status_code == 401

    jobs = RayJobs(url, headers=cluster.headers)
    assert jobs.get("intruder") is None  # never created
    # The service's own calls, with the token: a job is submitted and its driver (which
    # inherits the token from the cluster) runs to the end.
    # Ray's head answers before its job agent has registered (it then says 500, "no
    # available agent"); the scheduler puts such a job back in the queue and tries again on
    # its next tick, and so does this test, for a bounded time.
    deadline = time.time() + 120
    while True:
        try:
            assert jobs.submit("nestor-auth-check", "python -c \"print('inside')\"", {})
            break
        except RuntimeError:
            assert time.time() < deadline
            time.sleep(1)
    while (state := jobs.get("nestor-auth-check").status) not in ("SUCCEEDED", "FAILED"):
        assert time.time() < deadline, state
        time.sleep(0.5)
    assert state == "SUCCEEDED"
    assert cluster.resources()["CPU"] == 1.0  # the state API, with the token


def test_a_driver_without_the_token_cannot_join_the_embedded_cluster(guarded, tmp_path):
    """The gRPC door too: ``ray.init(address=...)`` from a process that has no Ray token
    (none in its environment, none in its home) is refused; with the token it joins."""
    cluster, _ = guarded
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    join = (
        f"import ray; ray.init(address={cluster.gcs_address!r}, log_to_driver=False); "
        "print('joined', ray.cluster_resources().get('CPU'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "joined" not in out.stdout, out.stdout + out.stderr[-2000:]
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
    out = subprocess.run(
        [sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "joined 1.0" in out.stdout, out.stderr[-2000:]
