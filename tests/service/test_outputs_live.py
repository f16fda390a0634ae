"""What comes out of a job, through the whole service on the real Ray: a 2-worker ZeRO-2
Adan job's downloaded model and optimizer state continue training in a plain process
exactly as the same job trained for longer inside Nestor; a worker's print is in the job's
log, also after a service restart; a worker's exception is in the job's error; init_from
carries weights from a 2-worker job into a 1-worker one, and refuses a model they do not fit."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

from optimizers import Adan, create_optimizer
from workers import TrainSpec
from workers.data import Objective, batch_indices, fetch, load_data

from .live import wait_for

MODULE = f"nestor_outputs_{uuid.uuid4().hex[:8]}"

PROJECT = """
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset



class Net(nn.Module):
    def __init__(self, d, width, classes, fail_at=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, classes))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise RuntimeError(f"boom in forward call {self.calls}: the user's own bug")
        return self.body(x)


def build(data, width=16, fail_at=None, dtype="float64"):
    rank = os.environ.get("RANK", "?")
    print(f"hello from the user's factory, width {width}, rank {rank}")
    return Net(data.train[0][0].shape[0], width, 3, fail_at).to(getattr(torch, dtype))


def load(n=3000, d=10, seed=0, dtype="float64"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=getattr(torch, dtype))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x[300:], y[300:]), TensorDataset(x[:300], y[:300])
"""

SPEC = {
    "model": {"factory": f"{MODULE}:build", "kwargs": {"width": 16}},
    "dataset": {"factory": f"{MODULE}:load"},
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "lr_schedule": {"kind": "constant"},
    "batch_size": 256,
    "micro_batch_size": 64,  # two micro-batches per rank: accumulation is exercised
    "num_workers": 2,
    "zero_stage": 2,
    "eval_every": 3,
    "max_restarts": 0,
}
SHORT, LONG = 6, 10


def fp32(spec: dict) -> dict:
    """The same job with the model and data in float32."""
    kwargs = {"dtype": "float32"}
    model = {**spec["model"], "kwargs": {**spec["model"]["kwargs"], **kwargs}}
    return {**spec, "model": model, "dataset": {**spec["dataset"], "kwargs": kwargs}}


@pytest.fixture(scope="module")
def project(service, tmp_path_factory):
    directory = tmp_path_factory.mktemp("outputs-project")
    (directory / f"{MODULE}.py").write_text(textwrap.dedent(PROJECT))
    return directory, service[1].ensure_package(directory)


@pytest.fixture(scope="module")
def jobs(service, project):
    """Every job of this module, submitted at once (the scheduler runs what fits) and
    waited for: the short job, the long one, a failing one."""
    _, client = service
    _, package = project
    base = {**SPEC, "code": package}
    submitted = {
        "short": client.submit(
            {**base, "max_steps": SHORT, "checkpoint_every": 2, "keep_checkpoints": 1}
        ),
        "long": client.submit({**base, "max_steps": LONG}),
        "short fp32": client.submit({**fp32(base), "max_steps": SHORT}),
        "long fp32": client.submit({**fp32(base), "max_steps": LONG}),
        "fails": client.submit(
            {
                **base,
                "model": {"factory": f"{MODULE}:build", "kwargs": {"fail_at": 3}},
                "max_steps": 5,
            }
        ),
    }
    return {k: client.wait(j["id"], timeout=600) for k, j in submitted.items()}


@pytest.mark.parametrize("dtype, tolerance", [("", 1e-12), (" fp32", 1e-6)])
def test_downloaded_model_and_optimizer_continue_exactly_as_longer_training(
    service, project, jobs, tmp_path, monkeypatch, dtype, tolerance
):
    """fp64 to 1e-12, fp32 to 1e-6: the 2 ranks' reduce-scatter sums gradients in another
    order than one process does, so only rounding may differ."""
    _, client = service
    directory, package = project
    short, long_ = jobs["short" + dtype], jobs["long" + dtype]
    assert short["status"] == long_["status"] == "succeeded", (short, long_)
    names = {a["name"] for a in client.artifacts(short["id"])["data"]}
    assert {"model.pt", "optimizer.pt", "spec.json", "result.json", "metrics.csv"} <= names
    if not dtype:
        assert client.artifacts(short["id"])["checkpoints"] == [4]  # keep_checkpoints: 1
    for name in ("model.pt", "optimizer.pt"):
        client.download(short["id"], name, tmp_path)
    client.download(long_["id"], "model.pt", tmp_path / "long.pt")

    monkeypatch.syspath_prepend(str(directory))  # the user's factories, in this process
    base = {**SPEC, "code": package, "max_steps": LONG}
    spec = TrainSpec.model_validate(fp32(base) if dtype else base)
    data = load_data(spec)
    model = sys.modules[MODULE].build(data, **spec.model_factory().kwargs)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = create_optimizer(model.parameters(), spec.optimizer_spec())
    assert isinstance(opt, Adan)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    objective = Objective(spec, data)
    for step in range(SHORT, LONG):  # the global batches Nestor's ranks split between them
        x, y = fetch(data.train, batch_indices(step, spec.batch_size, len(data.train), spec.seed))
        opt.zero_grad()
        objective(model(x), y).backward()
        opt.step()

    expected = torch.load(tmp_path / "long.pt", weights_only=True)
    ours = model.state_dict()
    assert ours.keys() == expected.keys()
    diff = max((ours[k] - expected[k]).abs().max().item() for k in ours)
    assert next(iter(ours.values())).dtype == (torch.float32 if dtype else torch.float64)
    assert diff <= tolerance, diff
    # The same from the model alone would not be: the optimizer state is what carries on.
    fresh = create_optimizer(model.parameters(), spec.optimizer_spec())
    assert fresh.state == {}


def test_a_workers_print_is_in_the_log_and_an_exception_in_the_error(service, jobs):
    _, client = service
    lines = client.logs(jobs["short"]["id"], limit=10_000)["lines"]
    for rank in (0, 1):
        assert any(
            line.startswith(f"[rank {rank}] hello from the user's factory, width 16")
            for line in lines
        ), lines[:40]
    assert any(line.startswith("[driver] ") for line in lines)

    failed = jobs["fails"]
    assert failed["status"] == "failed", failed
    assert "RuntimeError: boom in forward call 3: the user's own bug" in failed["error"]
    assert failed["error"].startswith("rank ")
    tail = client.logs(failed["id"], limit=10_000)["lines"]
    assert any("Traceback (most recent call last)" in line for line in tail)


def test_init_from_a_two_worker_job_into_one_worker_and_a_model_it_does_not_fit(
    service, project, jobs, tmp_path
):
    _, client = service
    _, package = project
    source = jobs["short"]
    # lr 0: the weights must come through unchanged (at another world size and stage).
    frozen = {**SPEC, "code": package, "num_workers": 1, "zero_stage": 1, "max_steps": 2}
    frozen["optimizer"] = {**SPEC["optimizer"], "lr": 0.0}
    one = client.submit({**frozen, "init_from": {"job": source["id"], "optimizer_state": True}})
    wider = {**frozen, "model": {"factory": f"{MODULE}:build", "kwargs": {"width": 24}}}
    misfit = client.submit({**wider, "init_from": {"job": source["id"], "step": 4}})
    one, misfit = client.wait(one["id"], timeout=400), client.wait(misfit["id"], timeout=400)
    assert one["status"] == "succeeded", one
    client.download(one["id"], "model.pt", tmp_path / "one.pt")
    client.download(source["id"], "model.pt", tmp_path / "source.pt")
    ours = torch.load(tmp_path / "one.pt", weights_only=True)
    theirs = torch.load(tmp_path / "source.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert misfit["status"] == "failed"
    assert f"init_from job {source['id']} step 4" in misfit["error"]
    assert (
        "body.0.weight is (16, 10)" in misfit["error"]
        and "(24, 10) in this model" in misfit["error"]
    )


def test_the_log_outlives_a_service_restart(service, jobs):
    live, client = service
    job_id = jobs["short"]["id"]
    before = client.logs(job_id, limit=10_000)
    live.stop()
    live.start()
    after = wait_for(lambda: client.logs(job_id, limit=10_000), timeout=60)
    assert after["lines"] == before["lines"] and len(after["lines"]) > 0
    assert any("] hello from the user's factory" in line for line in after["lines"])
