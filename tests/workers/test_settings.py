"""The workers' settings: one typed object read from the environment, with errors that name
the variable and the value."""

from __future__ import annotations

import pytest

from workers.settings import WorkerSettings


def test_defaults_and_overrides():
    assert WorkerSettings.from_env({}) == WorkerSettings()
    assert WorkerSettings() == WorkerSettings(4, 600.0, 10 * 2**20, None)
    read = WorkerSettings.from_env(
        {
            "NESTOR_WARM_WORKERS": "2",
            "NESTOR_WARM_IDLE_SECONDS": "120",
            "NESTOR_MAX_LOG_BYTES": "100",  # raised to the least cap
            "NESTOR_PEAK_TFLOPS": "989.5",
        }
    )
    assert read == WorkerSettings(2, 120.0, 4096, 989.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NESTOR_WARM_WORKERS", "many"),
        ("NESTOR_WARM_IDLE_SECONDS", "-1"),
        ("NESTOR_PEAK_TFLOPS", "0"),
        ("NESTOR_PEAK_TFLOPS", "inf"),
    ],
)
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}: '{value}'"):
        WorkerSettings.from_env({name: value})


def test_a_bad_log_cap_keeps_the_default():
    # The cap must never fail a job: a value that is not a number is ignored.
    assert WorkerSettings.from_env({"NESTOR_MAX_LOG_BYTES": "lots"}).max_log_bytes == 10 * 2**20
