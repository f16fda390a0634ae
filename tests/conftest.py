"""Session-wide fixtures: one local Ray cluster (a real head node) for the whole session;
the markers, and the CUDA tier's deselection where there is no CUDA device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CUDA_TIER = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: compiles kernels with torch.compile (slow)")
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (tests/gpu); deselected where torch sees none"
    )


@pytest.hookimpl(trylast=True)  # after -m and -k: count what would run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a CUDA device the ``cuda`` tests are deselected, never skipped or passed, and
    the terminal summary says so in one line (the CPU dry run, ``NESTOR_TEST_DEVICE=cpu``,
    keeps them: see tests/gpu/conftest.py)."""
    tier = [item for item in items if item.get_closest_marker("cuda")]
    if not tier:
        return
    import torch  # here, not at the top: this file stays quick to import

    from tests.gpu import DEVICE_VARIABLE, dry_run

    if dry_run():
        config.stash[_CUDA_TIER] = (
            f"CUDA tier: {len(tier)} tests run on the CPU ({DEVICE_VARIABLE}=cpu dry run: "
            f"proves the test code runs, not CUDA)"
        )
    elif torch.cuda.is_available():
        config.stash[_CUDA_TIER] = (
            f"CUDA tier: {len(tier)} tests selected on {torch.cuda.device_count()} CUDA "
            f"device(s), torch {torch.__version__}"
        )
    else:
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        config.stash[_CUDA_TIER] = (
            f"CUDA tier: {len(tier)} tests deselected (no CUDA device: torch "
            f"{torch.__version__}, {build})"
        )
        deselected = {id(item) for item in tier}
        config.hook.pytest_deselected(items=tier)
        items[:] = [item for item in items if id(item) not in deselected]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    line = config.stash.get(_CUDA_TIER, None)
    if line is not None:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def nestor_home(tmp_path_factory) -> str:
    home = str(tmp_path_factory.mktemp("nestor-home"))
    os.environ["NESTOR_HOME"] = home
    return home


@pytest.fixture(scope="session")
def ray_cluster(nestor_home):
    """Two Ray nodes on loopback, started as separate processes: a head with the dashboard
    (the Jobs API) and a worker node, 2 logical CPUs each on this 2-core machine; started
    once, stopped at the end of the session."""
    from service.ray_cluster import RayCluster

    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster
    # Each test module's service has its own home, so its jobs their own warm workers: let
    # them go after two idle minutes, not ten, so that a session does not hoard memory.
    os.environ.setdefault("NESTOR_WARM_IDLE_SECONDS", "120")
    # Without Ray's token auth, so that this process can join it as a driver; the service's
    # own embedded clusters (tests/e2e, test_ray_auth.py) run with it.
    cluster = RayCluster(None, Path(nestor_home) / "ray", num_cpus=2, auth=False)
    cluster.start()
    cluster.add_node(num_cpus=2)
    yield cluster
    import ray

    ray.shutdown()
    cluster.stop(drain=5)  # nothing to keep: Ray's drain of leftover tasks takes up to 30 s


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This process connected to the session's cluster as a Ray driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    return ray


@pytest.fixture(autouse=True)
def _default_dtype_is_left_alone():
    """A test (or user code it imports in-process) that changes torch's default dtype fails
    itself, instead of making float32 tests elsewhere in the session fail with a dtype
    mismatch."""
    import torch

    yield
    leaked = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    assert leaked == torch.float32, f"the test left torch's default dtype at {leaked}"
