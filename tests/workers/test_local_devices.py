"""`nestor train --local` on GPUs: which backend and devices the local processes get, and
the errors when the GPUs a spec asks for are not there (the GPU runs are tests/gpu's)."""

from __future__ import annotations

import json

import pytest

from service.cli import main as nestor
from workers import TrainSpec, launcher
from workers.launcher import LocalDevicesError, local_devices, on_this_machine

DIGITS = {
    "model": "digits-mlp",
    "dataset": {"name": "digits"},
    "batch_size": 128,
    "micro_batch_size": 32,
    "max_steps": 2,
}


def spec(workers: int, use_gpu: bool) -> TrainSpec:
    return TrainSpec.model_validate({**DIGITS, "num_workers": workers, "use_gpu": use_gpu})


@pytest.mark.parametrize("cuda_count", [0, 2])
def test_without_use_gpu_every_rank_is_on_the_cpu_over_gloo(cuda_count):
    # GPUs on the machine do not move a CPU spec onto them: the spec names the device.
    assert local_devices(spec(2, False), cuda_count) == ("gloo", ["cpu", "cpu"])


def test_use_gpu_puts_rank_r_on_cuda_r_over_nccl():
    assert local_devices(spec(2, True), 2) == ("nccl", ["cuda:0", "cuda:1"])
    assert local_devices(spec(1, True), 4) == ("nccl", ["cuda:0"])


def test_more_workers_than_gpus_is_an_error_naming_both_numbers():
    with pytest.raises(LocalDevicesError, match="num_workers=4 but only 2 CUDA devices are"):
        local_devices(spec(4, True), 2)
    with pytest.raises(LocalDevicesError, match="num_workers=2 but only 1 CUDA device is"):
        local_devices(spec(2, True), 1)


def test_use_gpu_without_cuda_is_an_error():
    with pytest.raises(LocalDevicesError, match="use_gpu is true but torch sees no CUDA device"):
        local_devices(spec(1, True), 0)


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        (2, "nestor: error: num_workers=4 but only 2 CUDA devices are visible"),
        (0, "nestor: error: use_gpu is true but torch sees no CUDA device"),
    ],
)
def test_cli_says_so_in_one_line_before_training(tmp_path, capsys, monkeypatch, visible, message):
    monkeypatch.setattr(launcher, "cuda_device_count", lambda: visible)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**DIGITS, "num_workers": 4, "use_gpu": True}))
    with pytest.raises(SystemExit) as info:
        nestor(["train", str(path), "--local", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists(), "nothing started"


def test_the_cli_trains_on_the_gpus_there_are_unless_the_spec_says_otherwise():
    unset = TrainSpec.model_validate({**DIGITS, "num_workers": 2})
    assert on_this_machine(unset, 0).use_gpu is False, "no GPU: the CPU"
    on_gpus = on_this_machine(unset, 2)
    assert on_gpus.use_gpu is True and local_devices(on_gpus, 2) == ("nccl", ["cuda:0", "cuda:1"])
    with pytest.raises(LocalDevicesError, match="num_workers=2 but only 1 CUDA device is"):
        local_devices(on_this_machine(unset, 1), 1)
    assert on_this_machine(spec(2, False), 2).use_gpu is False, "said false: the CPU"
    assert on_this_machine(spec(2, True), 2).use_gpu is True
