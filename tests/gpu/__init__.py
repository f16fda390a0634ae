"""The CUDA tier: tests marked ``cuda``, deselected where torch sees no CUDA device (how to
run it on a GPU machine, and its CPU dry run: ``conftest.py``)."""

from __future__ import annotations

import os

DEVICE_VARIABLE = "NESTOR_TEST_DEVICE"


def dry_run() -> bool:
    """Whether ``NESTOR_TEST_DEVICE=cpu`` asks for the CPU dry run (any other value but
    unset or ``cuda`` is a mistake, and says so)."""
    value = os.environ.get(DEVICE_VARIABLE, "cuda")
    if value not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_VARIABLE}={value!r}: use 'cpu' (a dry run) or leave it unset")
    return value == "cpu"
