"""Elastic jobs in local processes: a job resized 3 -> 2 -> 3 workers mid-run trains exactly
as the same job at a fixed size (fp64, 1e-10), every step reported once; the world-size
arithmetic (each rank's share, its micro-batches, their weights) and the spec's rules."""

from __future__ import annotations

import json
import textwrap
import threading
import time
import uuid

import pytest
import torch
from pydantic import ValidationError

from workers import TrainSpec
from workers.elastic import read_resize, write_resize
from workers.launcher import run_local
from workers.run_dir import RunDir

from ..helpers import read_jsonl

MODULE = f"nestor_elastic_{uuid.uuid4().hex[:8]}"
PROJECT = """
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self, d, width, pause):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, 3))
        self.pause = pause

    def forward(self, x):
        if self.training and self.pause:
            time.sleep(self.pause)  # steps slow enough for the test to resize mid-run
        return self.body(x)


def build(data, width=16, pause=0.0):
    return Net(data.train[0][0].shape[0], width, pause).double()


def load(n=3000, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x[300:], y[300:]), TensorDataset(x[:300], y[:300])
"""

STEPS = 40
SPEC = {
    "model": {"factory": f"{MODULE}:build", "kwargs": {"width": 16}},
    "dataset": {"factory": f"{MODULE}:load"},
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "lr_schedule": {"kind": "cosine", "warmup_steps": 4},
    "max_grad_norm": 1.0,
    # 256 over 3 workers: shares of 85, 85 and 86 samples, two micro-batches each (43 + 42,
    # 43 + 43): the uneven weights are exercised, against 2 x 2 x 64 at the fixed size.
    "batch_size": 256,
    "micro_batch_size": 64,
    "zero_stage": 2,
    "max_steps": STEPS,
    "eval_every": 10,
    "checkpoint_every": 1000,  # only the resizes checkpoint
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    directory = tmp_path_factory.mktemp("elastic-project")
    (directory / f"{MODULE}.py").write_text(textwrap.dedent(PROJECT))
    return str(directory)


def params(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run_dir).model, weights_only=True)


def worlds(run_dir) -> list[int]:
    """The world size of each segment that started, from status.jsonl."""
    rows = read_jsonl(RunDir(run_dir).status) if RunDir(run_dir).status.exists() else []
    return [r["world_size"] for r in rows if r["status"] == "running" and "world_size" in r]


def last_step(run_dir) -> int:
    path = RunDir(run_dir).metrics
    rows = read_jsonl(path) if path.exists() else []
    return rows[-1]["step"] if rows else 0


def test_a_job_resized_3_2_3_ends_where_the_fixed_size_job_does(project, tmp_path, nestor_home):
    fixed = run_local(
        TrainSpec.model_validate({**SPEC, "num_workers": 2}), tmp_path / "fixed", project
    )
    assert fixed["status"] == "succeeded"

    run = tmp_path / "elastic"
    run.mkdir()
    write_resize(run, 3, "started on 3")
    spec = TrainSpec.model_validate(
        {
            **SPEC,
            "num_workers": {"min": 2, "max": 3},
            "model": {**SPEC["model"], "kwargs": {"width": 16, "pause": 0.01}},
        }
    )
    plan = [(2, "resized to 2 by the test"), (3, "resized to 3 by the test")]
    errors: list[BaseException] = []

    def resize_mid_run() -> None:
        try:
            for n, reason in plan:
                deadline = time.time() + 300
                # Three steps into the segment the last resize started: then ask for n.
                while not (worlds(run) and worlds(run)[-1] != n and last_step(run) >= 3):
                    if time.time() > deadline:
                        raise TimeoutError(f"no segment to resize to {n}")
                    time.sleep(0.01)
                seen = last_step(run)
                while last_step(run) < seen + 3:
                    time.sleep(0.01)
                write_resize(run, n, reason)
                while not (worlds(run) and worlds(run)[-1] == n):
                    if time.time() > deadline:
                        raise TimeoutError(f"the job did not resize to {n}")
                    time.sleep(0.01)
        except BaseException as e:  # reported by the test below
            errors.append(e)

    thread = threading.Thread(target=resize_mid_run, daemon=True)
    thread.start()
    result = run_local(spec, run, project)
    thread.join(timeout=30)
    assert not errors, errors
    assert result["status"] == "succeeded" and result["world_size"] == 3
    assert worlds(run) == [3, 2, 3]
    status = read_jsonl(RunDir(run).status)
    reasons = [r.get("reason") for r in status if r["status"] == "running"]
    assert reasons == ["started on 3", "resized to 2 by the test", "resized to 3 by the test"]
    resized_at = [r["step"] for r in status if r["status"] == "resizing"]
    assert len(resized_at) == 2 and 0 < resized_at[0] < resized_at[1] < STEPS
    # Each resize resumed from its own step-boundary checkpoint: nothing recomputed, every
    # step's metrics once, in order.
    resumed = [r["resumed_from_step"] for r in status if "resumed_from_step" in r]
    assert resumed == resized_at
    assert [r["step"] for r in read_jsonl(RunDir(run).metrics)] == list(range(1, STEPS + 1))

    ours, theirs = params(run), params(tmp_path / "fixed")
    assert ours.keys() == theirs.keys()
    apart = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"3 -> 2 -> 3 at steps {resized_at} vs fixed 2 workers: {apart:.2e} apart")
    for key in ours:
        assert ours[key].dtype == torch.float64
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-10), key
    assert json.loads(RunDir(run).result.read_text())["steps"] == STEPS


def test_each_rank_takes_its_share_of_the_global_batch_in_micro_batches():
    spec = TrainSpec.model_validate({**SPEC, "num_workers": {"min": 2, "max": 3}})
    assert spec.elastic and (spec.min_workers, spec.max_workers) == (2, 3)
    assert [spec.micro_sizes(r, 2) for r in range(2)] == [[64, 64], [64, 64]]
    assert [spec.micro_sizes(r, 3) for r in range(3)] == [[43, 42], [43, 42], [43, 43]]
    for world in (2, 3):
        assert sum(sum(spec.micro_sizes(r, world)) for r in range(world)) == 256
    fixed = TrainSpec.model_validate({**SPEC, "num_workers": 2})
    assert not fixed.elastic and fixed.accumulation_steps == 2
    assert fixed.micro_sizes(1, 2) == [64, 64]


@pytest.mark.parametrize(
    "workers, batch, micro, message",
    [
        ({"min": 3, "max": 2}, 256, 64, "min (3) must not exceed max (2)"),
        ({"min": 2, "max": 300}, 256, 64, "less than or equal to 256"),
        ({"min": 1, "max": 8}, 4, 4, "batch_size (4) must be at least num_workers.max (8)"),
        ({"min": 2, "max": 3}, 5, 1, "on 2 workers leaves a worker fewer samples"),
    ],
)
def test_bad_ranges_name_the_field(workers, batch, micro, message):
    with pytest.raises(ValidationError) as e:
        TrainSpec.model_validate(
            {**SPEC, "num_workers": workers, "batch_size": batch, "micro_batch_size": micro}
        )
    assert message in str(e.value)


def test_a_resize_request_is_read_whole_or_not_at_all(tmp_path):
    assert read_resize(tmp_path) is None
    write_resize(tmp_path, 4, "capacity freed")
    asked = read_resize(tmp_path)
    assert (asked.num_workers, asked.reason) == (4, "capacity freed")
    RunDir(tmp_path).resize.write_text('{"num_workers": "many"}')
    assert read_resize(tmp_path) is None
