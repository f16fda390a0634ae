"""A user's own project through the whole service on the real two-node local Ray: uploaded
as a code package, shipped to the workers by Ray's runtime_env, trained data-parallel with
ZeRO-2, resumed after a SIGKILL, and each error a user will hit ending the job `failed`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import textwrap
import uuid

import pytest
import torch

from service.client import NestorError

from ..helpers import read_jsonl
from .live import run_dir, wait_for

MODULE = f"nestor_user_{uuid.uuid4().hex[:8]}"  # importable only from the package

MODEL = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class Gated(nn.Module):
    '''Not one of Nestor's models: a gated MLP with a learned temperature.'''

    def __init__(self, d, width, classes):
        super().__init__()
        self.value, self.gate = nn.Linear(d, width), nn.Linear(d, width)
        self.head = nn.Linear(width, classes)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = self.value(x) * torch.sigmoid(self.gate(x))
        return self.head(h) / self.temperature


def build(data, width=32):
    return Gated(data.train[0][0].shape[0], width, 4)


def narrow(data):
    return nn.Linear(data.train[0][0].shape[0], 9)


def loss(outputs, targets):
    return F.cross_entropy(outputs, targets, label_smoothing=0.05)


def four_classes(outputs, targets):
    assert outputs.shape[-1] == 4, f"want 4 logits per sample, got {outputs.shape[-1]}"
    return F.cross_entropy(outputs, targets)


def load(n=4000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :4] * x[:, 4:8]).argmax(dim=1)  # 4 classes from feature interactions
    return TensorDataset(x[400:], y[400:]), TensorDataset(x[:400], y[:400])


def broken(path="/nowhere"):
    return _read(path)


def _read(path):
    raise FileNotFoundError(f"cannot open the user's data at {path}")
"""

SPEC = {
    "model": {"factory": f"{MODULE}:build", "kwargs": {"width": 32}},
    "dataset": {"factory": f"{MODULE}:load", "kwargs": {"n": 4000}},
    "loss": f"{MODULE}:loss",
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "batch_size": 512,
    "micro_batch_size": 128,
    "num_workers": 2,
    "zero_stage": 2,
    "max_steps": 30,
    "eval_every": 10,
    "checkpoint_every": 5,
}


@pytest.fixture(scope="module")
def package(service, tmp_path_factory):
    _, client = service
    project = tmp_path_factory.mktemp("project")
    (project / f"{MODULE}.py").write_text(textwrap.dedent(MODEL))
    (project / "notes.txt").write_text("not code")
    assert importlib.util.find_spec(MODULE) is None  # the service's environment lacks it
    return client.ensure_package(project)


@pytest.fixture(scope="module")
def two_worker_job(service, package):
    live, client = service
    job = client.submit({**SPEC, "code": package}, name="user-2w")
    done = client.wait(job["id"], timeout=400)
    assert done["status"] == "succeeded", done
    return done, json.loads((run_dir(live, job["id"]) / "result.json").read_text())


def test_a_package_job_trains_on_two_workers_as_on_one(service, package, two_worker_job):
    live, client = service
    two, two_result = two_worker_job
    one = client.wait(
        client.submit({**SPEC, "code": package, "num_workers": 1}, name="user-1w")["id"],
        timeout=400,
    )
    assert one["status"] == "succeeded", one
    curves = [
        client.metrics(j["id"], keys=["train_loss"])["series"]["train_loss"] for j in (one, two)
    ]
    assert curves[0]["step"] == curves[1]["step"] == list(range(1, 31))
    assert max(abs(a - b) for a, b in zip(*(c["value"] for c in curves), strict=True)) < 1e-4
    assert curves[1]["value"][-1] < curves[1]["value"][0]
    p1 = torch.load(run_dir(live, one["id"]) / "model.pt", weights_only=True)
    p2 = torch.load(run_dir(live, two["id"]) / "model.pt", weights_only=True)
    assert set(p2) == {
        "value.weight",
        "value.bias",
        "gate.weight",
        "gate.bias",
        "head.weight",
        "head.bias",
        "temperature",
    }
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-5
    assert "val_accuracy" in two_result["final_metrics"]


def test_a_sigkilled_worker_of_a_package_job_resumes_to_the_same_parameters(
    service, package, two_worker_job
):
    live, client = service
    _, uninterrupted = two_worker_job
    job = client.submit({**SPEC, "code": package}, name="user-kill")

    def past_first_checkpoint() -> int | None:
        """The step the workers last wrote to the run directory once it is >= 6 (the
        service's last_step lags behind it: on a fast machine the job could end between
        the two)."""
        try:
            steps = [r["step"] for r in read_jsonl(run_dir(live, job["id"]) / "metrics.jsonl")]
        except (AssertionError, OSError, ValueError):  # no run directory yet, a torn line
            return None
        return steps[-1] if steps and steps[-1] >= 6 else None

    at = wait_for(past_first_checkpoint, timeout=300, every=0.02)
    workers = read_jsonl(run_dir(live, job["id"]) / "workers.jsonl")
    os.kill(next(w["pid"] for w in workers if w["rank"] == 1), signal.SIGKILL)
    assert at < 30, "the job ended before a worker could be killed"
    done = client.wait(job["id"], timeout=400)
    assert done["status"] == "succeeded", done
    directory = run_dir(live, job["id"])
    assert len(read_jsonl(directory / "workers.jsonl")) >= 4  # both ranks started again
    result = json.loads((directory / "result.json").read_text())
    assert result["params_sha256"] == uninterrupted["params_sha256"]
    steps = client.metrics(job["id"], keys=["train_loss"])["series"]["train_loss"]["step"]
    assert steps == list(range(1, 31))


def test_each_error_in_a_users_code_ends_the_job_failed_naming_the_cause(service, package):
    live, client = service
    cases = {
        "no-factory": ({"model": {"factory": f"{MODULE}:bulid"}}, "has no attribute 'bulid'"),
        "raises": (
            {"dataset": {"factory": f"{MODULE}:broken", "kwargs": {"path": "/data/x"}}},
            "cannot open the user's data at /data/x",
        ),
        "misfit": (
            {"model": {"factory": f"{MODULE}:narrow"}, "loss": f"{MODULE}:four_classes"},
            "does not fit the loss",
        ),
        "too-small": (
            {"dataset": {"factory": f"{MODULE}:load", "kwargs": {"n": 500}}},
            "the training set has 100 samples, fewer than one global batch (batch_size=512)",
        ),
    }
    jobs = {
        name: client.submit(
            {**SPEC, "code": package, "num_workers": 1, "micro_batch_size": 512, **change},
            name=name,
        )
        for name, (change, _) in cases.items()
    }
    for name, (_, expected) in cases.items():
        done = client.wait(jobs[name]["id"], timeout=400)
        assert done["status"] == "failed", (name, done)
        assert expected in done["error"], (name, done["error"])
        # Not retried: a restart would fail the same way.
        assert len(read_jsonl(run_dir(live, done["id"]) / "workers.jsonl")) == 1, name
    raised = client.job(jobs["raises"]["id"])["error"]
    assert f'{MODULE}.py", line' in raised and "in _read" in raised  # the user's traceback


def test_a_spec_naming_a_package_the_service_lacks_is_refused(service):
    _, client = service
    missing = "sha256:" + "0" * 64
    with pytest.raises(NestorError) as e:
        client.submit({**SPEC, "code": missing})
    assert e.value.status == 422
    assert e.value.detail[0]["loc"][-1] == "code" and missing in e.value.detail[0]["msg"]
