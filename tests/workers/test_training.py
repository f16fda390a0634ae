"""The training loop in local processes (no Ray): resume, NaN handling, the CLI."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.utils._python_dispatch

from optimizers.zero.collectives import end_process_group
from service.cli import main as nestor
from workers import TrainSpec
from workers.launcher import run_local
from workers.loop import Session, train
from workers.reporting import JsonlReporter

from ..helpers import read_jsonl

BASE = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 3000},
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "batch_size": 512,
    "micro_batch_size": 128,
    "num_workers": 2,
    "zero_stage": 2,
    "max_steps": 24,
    "eval_every": 8,
    "checkpoint_every": 8,
    "max_grad_norm": 1.0,
}


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, nestor_home):
    spec = TrainSpec.model_validate(BASE)
    full = run_local(spec, tmp_path / "full")
    assert full["status"] == "succeeded"
    # A run directory holding only the step-8 checkpoint of the first run: the second run
    # resumes from it and must end bit for bit where the first one did.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-00000008", resumed_dir / "step-00000008"
    )
    resumed = run_local(spec, tmp_path / "resumed")
    assert resumed["params_sha256"] == full["params_sha256"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps[0] == 9 and steps[-1] == 24
    status = read_jsonl(tmp_path / "resumed" / "status.jsonl")
    assert status[0] == {**status[0], "status": "running", "resumed_from_step": 8}


def test_an_int8_state_job_resumes_exactly_and_reports_its_bytes_per_parameter(
    tmp_path, nestor_home
):
    """A job whose Adan keeps int8 state (ZeRO-2, 2 workers): resumed from its step-8
    checkpoint it ends bit for bit where the uninterrupted run did, both downloadable
    optimizer.pt files hold the same codes and scales, and it reports the state's bytes per
    parameter as measured from the tensors (int8 for tensors >= 4096 elements, fp32 below)."""
    optimizer = {**BASE["optimizer"], "state_precision": "int8"}
    spec = TrainSpec.model_validate({**BASE, "optimizer": optimizer})
    full = run_local(spec, tmp_path / "full")
    assert full["status"] == "succeeded"
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-00000008", resumed_dir / "step-00000008"
    )
    resumed = run_local(spec, tmp_path / "resumed")
    assert resumed["params_sha256"] == full["params_sha256"]
    a, b = (
        torch.load(tmp_path / d / "optimizer.pt", weights_only=True) for d in ("full", "resumed")
    )
    dtypes = {v.dtype for e in a["state"].values() for v in e.values() if v.ndim}
    assert {torch.int8, torch.uint8, torch.float32} <= dtypes
    for i, entry in a["state"].items():
        for key, v in entry.items():
            assert torch.equal(v, b["state"][i][key]), (i, key)

    from workers.contract import Data
    from workers.models import mnist1d_mlp  # the job's model: what its state should cost

    sizes = [
        p.numel()
        for p in mnist1d_mlp(
            Data(train=[(torch.zeros(40), 0)], val=[], num_classes=10)
        ).parameters()
    ]
    expected = sum(n * (4 * (1 + 4 / 256) if n >= 4096 else 16) for n in sizes) / sum(sizes)
    reported = [
        r["opt_state_bytes_per_param"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")
    ]
    assert reported and all(v == pytest.approx(expected, rel=0.02) for v in reported)
    assert expected < 16 / 3  # a saving, not only a figure


def test_non_finite_loss_fails_the_job_with_a_clear_error(tmp_path, nestor_home):
    spec = TrainSpec.model_validate(
        {
            **BASE,
            "num_workers": 1,
            "max_grad_norm": None,
            # The spec's lr is bounded (10); scaled linearly from a batch of 1 it is 5120.
            "optimizer": {"name": "adamw", "lr": 10},
            "lr_scaling": {"rule": "linear", "base_batch_size": 1},
            "max_bad_steps": 2,
            "checkpoint_every": 0,
        }
    )
    result = run_local(spec, tmp_path / "nan")
    assert result["status"] == "failed"
    assert "loss was non-finite" in result["error"] and "2 consecutive steps" in result["error"]
    metrics = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert metrics[-1]["train_loss"] is None and metrics[-1]["skipped"] == 1.0


def test_a_restart_without_a_checkpoint_reports_every_step_once(tmp_path, nestor_home):
    """A crashed attempt without a checkpoint left steps 1-5 (and a line torn by the crash):
    the next attempt starts from scratch and must discard them, not append after them."""
    spec = TrainSpec.model_validate(
        {**BASE, "num_workers": 1, "max_steps": 6, "eval_every": 3, "checkpoint_every": 0}
    )
    run = tmp_path / "run"
    run.mkdir()
    crashed = [json.dumps({"step": s, "time": 0.0, "train_loss": 99.0}) for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(crashed) + '\n{"step": 6, "trai')
    assert run_local(spec, run)["status"] == "succeeded"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["train_loss"] != 99.0 for r in records)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "spec file not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a spec is a JSON object"),
        (
            json.dumps({**BASE, "batch_size": 500}),
            "spec: batch_size (500) must equal micro_batch_size (128)",
        ),
        (json.dumps({**BASE, "optimizer": {"name": "adan", "lr": -1}}), "optimizer.lr"),
    ],
)
def test_cli_reports_bad_spec_files(tmp_path, capsys, content, message):
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        nestor(["train", str(path), "--local"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_trains_and_writes_metrics_and_result(tmp_path, nestor_home):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**BASE, "num_workers": 1, "max_steps": 6, "eval_every": 3}))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(spec), "--local", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
    assert "6/6" in proc.stderr  # the progress bar reached the end
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("train_loss", "lr", "grad_norm", "samples_per_s", "step_time", "opt_state_bytes"):
        assert key in records[0]
    for r in records:  # the step's parts: reading data, forward and backward, the optimizer
        parts = [r["data_time"], r["compute_time"], r["optimizer_time"]]
        assert min(parts) >= 0 and r["compute_time"] > 0
        assert sum(parts) <= r["step_time"] + 1e-9
    assert "val_accuracy" in records[2]
    result = json.loads((out / "result.json").read_text())
    assert len(result["params_sha256"]) == 64


def test_stop_at_ends_the_job_at_the_first_evaluation_that_reaches_the_target(
    tmp_path, nestor_home
):
    """Two ranks (ZeRO-2): the job stops at the first evaluation at or above the target,
    succeeded, and says at which step; a target it cannot reach lets it run to max_steps
    with the field null."""
    common = {**BASE, "max_steps": 60, "eval_every": 1000, "checkpoint_every": 0}
    target = {"metric": "val_accuracy", "value": 0.45}
    result = run_local(TrainSpec.model_validate({**common, "stop_at": target}), tmp_path / "hit")
    records = read_jsonl(tmp_path / "hit" / "metrics.jsonl")
    evaluated = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    first = next(step for step, acc in evaluated if acc >= 0.45)
    assert result["status"] == "succeeded" and result["reached_target_at_step"] == first
    assert result["steps"] == first < 60 and records[-1]["step"] == first
    # The cadence: every step up to 20, then never more than 5% of the step apart.
    steps = [s for s, _ in evaluated]
    early = min(20, len(steps))
    assert steps[:early] == list(range(1, early + 1))
    assert all(b - a <= max(1, 0.05 * b) for a, b in itertools.pairwise(steps))
    assert read_jsonl(tmp_path / "hit" / "status.jsonl")[-1]["reached_target_at_step"] == first

    never = {**target, "value": 1.0, "resolution": 0.5}
    result = run_local(
        TrainSpec.model_validate({**common, "max_steps": 12, "stop_at": never}),
        tmp_path / "miss",
    )
    assert result["status"] == "succeeded" and result["reached_target_at_step"] is None
    assert result["steps"] == 12
    evaluated = [
        r["step"] for r in read_jsonl(tmp_path / "miss" / "metrics.jsonl") if "val_loss" in r
    ]
    assert evaluated == [1, 2, 4, 8, 12]  # each at most twice the one before, and the end


class _Reads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``.item()``, ``float()``, ``bool()``):
    on a GPU each one waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _train_here(spec: TrainSpec, run_dir) -> tuple[int, list[dict]]:
    """Train ``spec`` in this process (a gloo group of one), counting value reads."""
    run_dir.mkdir(parents=True)
    dist.init_process_group("gloo", init_method=f"file://{run_dir / 'init'}", rank=0, world_size=1)
    try:
        with _Reads() as reads:
            train(spec, Session(0, 1, torch.device("cpu"), run_dir), JsonlReporter(run_dir / "m"))
    finally:
        end_process_group()
    return reads.count, read_jsonl(run_dir / "m")


def test_the_loop_reads_values_only_when_it_reports(tmp_path, nestor_home):
    # Between reports the loss, the gradient norm and the timings stay on the device: the
    # one read a step is whether the loss is finite (taken after the backward pass is
    # queued, so the device never waits on the host for it).
    common = {
        **BASE,
        "model": "digits-mlp",
        "dataset": {"name": "digits"},
        "num_workers": 1,
        "eval_every": 1000,  # only at the end, as the last report
        "checkpoint_every": 0,
    }
    runs = {
        steps: _train_here(
            TrainSpec.model_validate({**common, "max_steps": steps, "log_every": steps}),
            tmp_path / str(steps),
        )
        for steps in (6, 18)
    }
    (short, short_metrics), (long, long_metrics) = runs[6], runs[18]
    assert [m["step"] for m in short_metrics] == [6] and [m["step"] for m in long_metrics] == [18]
    assert long - short == 12, f"{(long - short) / 12:.1f} reads per unreported step"
    every = _train_here(
        TrainSpec.model_validate({**common, "max_steps": 6, "log_every": 1}), tmp_path / "1"
    )
    assert every[0] > short, "each report reads its values"
    assert every[1][-1]["train_loss"] == short_metrics[-1]["train_loss"]
    for key in ("step_time", "samples_per_s", "tflops", "grad_norm"):
        assert short_metrics[-1][key] > 0


def test_non_finite_loss_between_reports_fails_at_the_same_step(tmp_path, nestor_home):
    # Reports every 50 steps do not delay the rule: the job fails after max_bad_steps
    # consecutive bad steps, naming the step, and each bad step is reported as it happens.
    spec = TrainSpec.model_validate(
        {
            **BASE,
            "num_workers": 1,
            "max_grad_norm": None,
            "optimizer": {"name": "adamw", "lr": 10},
            "lr_scaling": {"rule": "linear", "base_batch_size": 1},
            "max_bad_steps": 3,
            "checkpoint_every": 0,
            "log_every": 50,
        }
    )
    result = run_local(spec, tmp_path / "nan")
    assert result["status"] == "failed"
    assert "for 3 consecutive steps" in result["error"]
    metrics = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    bad = [m for m in metrics if m.get("skipped") == 1.0]
    assert len(bad) == 3 and f"at step {bad[-1]['step']};" in result["error"]
    assert [m["step"] for m in bad] == list(range(bad[0]["step"], bad[0]["step"] + 3))
