import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compile: compiles kernels with torch.compile (slow)")
