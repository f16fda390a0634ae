"""The training loop on the GPU, and ``nestor train --local`` with one GPU per worker.

The loop runs here in this process as the only rank of an NCCL group (as
tests/workers/test_training.py drives it on the CPU, through ``run_local``'s worker); the
CLI runs as a user runs it, in a subprocess. Data sets: scikit-learn's digits and the
standard library's sources (no mnist1d, no Ray on the GPU machine).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from optimizers.zero.collectives import end_process_group
from workers import TrainSpec
from workers.launcher import cuda_device_count
from workers.loop import Session, train
from workers.reporting import JsonlReporter

from ..helpers import read_jsonl

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[2]
DIGITS = {
    "model": "digits-mlp",
    "dataset": {"name": "digits"},
    # Compiled kernels over the ZeRO shards (Triton on the GPU).
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02, "fused": True},
    "batch_size": 256,
    "micro_batch_size": 128,
    "zero_stage": 2,
    "max_steps": 6,
    "eval_every": 3,
    "max_grad_norm": 1.0,
}
CHARS = {  # attention (scaled_dot_product_attention) in bf16 on the GPU
    "model": {
        "factory": "workers.models:char_transformer",
        "kwargs": {"d": 64, "layers": 1, "heads": 2},
    },
    "dataset": {"name": "pystdlib-chars", "num_samples": 2000, "seq_len": 32},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "batch_size": 64,
    "micro_batch_size": 32,
    "zero_stage": 1,
    "max_steps": 6,
    "eval_every": 3,
}
CASES = {
    "digits-fp32": {**DIGITS, "precision": "fp32"},
    "digits-bf16": {**DIGITS, "precision": "bf16"},
    "chars-bf16": {**CHARS, "precision": "bf16"},
}


def train_alone(spec: TrainSpec, device: torch.device, backend: str, run_dir: Path):
    """Train ``spec`` in this process as the one rank of a ``backend`` group on ``device``;
    the result and the reported metrics."""
    run_dir.mkdir(parents=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init = f"file://{run_dir / 'init'}"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    try:
        reporter = JsonlReporter(run_dir / "metrics.jsonl")
        result = train(spec, Session(0, 1, device, run_dir), reporter)
    finally:
        end_process_group()
    return result, read_jsonl(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("case", CASES)
def test_the_loop_trains_on_the_gpu(case, device, backend, tmp_path, nestor_home):
    spec = TrainSpec.model_validate(CASES[case])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result, records = train_alone(spec, device, backend, tmp_path / "gpu")
    assert result["status"] == "succeeded" and result["steps"] == spec.max_steps, result
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == spec.max_steps and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], f"the loss did not go down: {losses}"
    assert "val_accuracy" in result["final_metrics"]
    if device.type == "cuda":  # the model, its state and the batches were on the GPU
        assert torch.cuda.max_memory_allocated(device) > 0
    if spec.precision == "fp32":
        # The same math as on the CPU: the same spec trained there reports the same losses
        # (its optimizer not compiled: which path steps it is not the math).
        unfused = spec.optimizer.model_copy(update={"fused": False})
        on_cpu = spec.model_copy(update={"optimizer": unfused})
        _, cpu = train_alone(on_cpu, torch.device("cpu"), "gloo", tmp_path / "cpu")
        for gpu_record, cpu_record in zip(records, cpu, strict=True):
            for key in ("train_loss", "val_loss", "grad_norm"):
                if key in gpu_record:
                    assert gpu_record[key] == pytest.approx(cpu_record[key], rel=1e-4), key


def local_spec(tmp_path: Path, workers: int, use_gpu: bool) -> Path:
    """``tmp_path/spec.json``: the digits MLP, its probe recording into ``tmp_path/probe``."""
    record = str(tmp_path / "probe")
    spec = {
        **DIGITS,
        "model": {"factory": "tests.gpu.probe:probe_mlp", "kwargs": {"record": record}},
        "precision": "bf16",
        "batch_size": 128 * workers,
        "micro_batch_size": 64,
        "max_steps": 4,
        "num_workers": workers,
        "use_gpu": use_gpu,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def nestor_train_local(spec: Path, out: Path) -> subprocess.CompletedProcess:
    """``nestor train SPEC --local --out OUT`` in a subprocess. ``--out`` keeps the service's
    settings (pydantic-settings) out of it: the GPU machine has only what workers/ needs."""
    command = [sys.executable, "-m", "service.cli", "train", str(spec), "--local"]
    return subprocess.run(
        [*command, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_nestor_train_local_puts_each_worker_on_its_own_gpu(tmp_path, device, world_size):
    workers = min(world_size, 2)
    use_gpu = device.type == "cuda"
    proc = nestor_train_local(local_spec(tmp_path, workers, use_gpu), tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded", proc.stdout
    backend, devices = ("nccl", "cuda") if use_gpu else ("gloo", "cpu")
    assert f"over {workers} worker(s) on " in proc.stderr and f"({backend})" in proc.stderr
    seen = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "probe").glob("*.json")),
        key=lambda s: s["rank"],
    )
    assert [s["rank"] for s in seen] == list(range(workers)), seen
    for s in seen:
        where = f"cuda:{s['rank']}" if use_gpu else devices
        assert s["inputs"] == where and s["parameters"] == [where], s
        assert s["backend"] == backend, s
        assert s["output_dtype"] == "torch.bfloat16", "bf16 autocast was not on"


def test_nestor_train_local_refuses_more_workers_than_gpus(tmp_path):
    visible = cuda_device_count()
    proc = nestor_train_local(local_spec(tmp_path, visible + 1, True), tmp_path / "run")
    assert proc.returncode == 2
    expected = (
        f"num_workers={visible + 1} but only {visible} CUDA device"
        if visible
        else "use_gpu is true but torch sees no CUDA device"
    )
    assert proc.stderr.startswith(f"nestor: error: {expected}"), proc.stderr
    assert not (tmp_path / "run").exists()
