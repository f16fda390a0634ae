"""The CUDA tier (marker ``cuda``): Nestor's optimizers, ZeRO over NCCL, the training loop and
``nestor train --local`` on GPUs, each held against the readable path or the CPU.

Where torch sees no CUDA device every test here is deselected (tests/conftest.py), and
``make test-gpu`` then fails: a tier that ran nothing is not a pass.

On a GPU machine without a venv or a package index (no pytest, no pydantic): the recipe
in README.md here, one command after ``tests/gpu/wheels.sh`` has fetched the wheels.

**Dry run on the CPU**: ``NESTOR_TEST_DEVICE=cpu python -m pytest -m cuda tests/gpu`` keeps
the tier selected and runs every test on the CPU, over gloo with two ranks where a test
spreads over GPUs. It proves that the test code runs (a dry run of a GPU run that may come
seldom); it is never a CUDA pass, and the summary line says so.
"""

from __future__ import annotations

import pytest
import torch

from . import dry_run


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the tier runs: the (first) GPU, or the CPU in the dry run."""
    return torch.device("cpu" if dry_run() else "cuda:0")


@pytest.fixture(scope="session")
def backend() -> str:
    """The process group backend of the tier's device."""
    return "gloo" if dry_run() else "nccl"


@pytest.fixture(scope="session")
def world_size() -> int:
    """Ranks for the tests that spread over GPUs: one per visible GPU (2 in the dry run)."""
    return 2 if dry_run() else torch.cuda.device_count()
