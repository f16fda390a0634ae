"""Session-wide fixtures: one local Ray for the whole test session, NESTOR_HOME per session."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: compiles kernels with torch.compile (slow)")


@pytest.fixture(scope="session")
def nestor_home(tmp_path_factory) -> str:
    home = str(tmp_path_factory.mktemp("nestor-home"))
    os.environ["NESTOR_HOME"] = home
    return home


@pytest.fixture(scope="session")
def ray_session(nestor_home):
    """A local Ray started once per session (4 logical CPUs: 2 workers plus Ray's own
    actors on this 2-core machine)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"NESTOR_HOME": nestor_home}},
    )
    yield ray
    ray.shutdown()
