"""Training on a real local Ray: 2 workers equal 1, a SIGKILLed worker is survived (in a
Ray Train group and in a warm group), and a warm worker reused by the next job carries
nothing from the job before it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from workers import TrainSpec
from workers.launcher import run_on_ray

from ..helpers import read_jsonl

SPEC = {
    "model": "mnist1d-cnn",
    "dataset": {"name": "mnist1d", "num_samples": 6000},
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "batch_size": 2048,
    "micro_batch_size": 512,
    "num_workers": 2,
    "zero_stage": 2,
    "max_steps": 30,
    "eval_every": 10,
    "checkpoint_every": 5,
    "max_grad_norm": 1.0,
}


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two")
    result = run_on_ray(TrainSpec.model_validate(SPEC), run_dir)
    assert result["status"] == "succeeded", result
    return run_dir, result


def test_two_workers_equal_one_worker_on_the_same_global_batch(two_worker_run, tmp_path):
    two_dir, _ = two_worker_run
    one = TrainSpec.model_validate({**SPEC, "num_workers": 1})  # 4 micro-batches, not 2
    result = run_on_ray(one, tmp_path)
    assert result["status"] == "succeeded"
    loss2 = [r["train_loss"] for r in read_jsonl(two_dir / "metrics.jsonl")]
    loss1 = [r["train_loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(loss1) == len(loss2) == 30
    assert max(abs(a - b) for a, b in zip(loss1, loss2, strict=True)) < 1e-4
    p1 = torch.load(tmp_path / "model.pt", weights_only=True)
    p2 = torch.load(two_dir / "model.pt", weights_only=True)
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-5
    assert loss2[-1] < loss2[0]


@pytest.mark.parametrize("warm", [False, True], ids=["ray-train-group", "warm-group"])
def test_sigkill_of_a_worker_is_survived_with_identical_parameters(two_worker_run, tmp_path, warm):
    """A warm group's worker killed mid-run: the driver kills the group and Ray Train
    resumes the job from its latest checkpoint, as it does for its own group."""
    _, uninterrupted = two_worker_run
    spec = TrainSpec.model_validate(SPEC)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run_on_ray(spec, tmp_path, warm=warm)))
    runner.start()
    metrics, workers = tmp_path / "metrics.jsonl", tmp_path / "workers.jsonl"
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        # After the first checkpoint (step 5), SIGKILL rank 1's process.
        if metrics.exists() and workers.exists():
            steps = [r["step"] for r in read_jsonl(metrics)]
            if steps and steps[-1] >= 6:
                pid = next(w["pid"] for w in read_jsonl(workers) if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed = steps[-1]
        time.sleep(0.02)
    runner.join(timeout=300)
    assert killed is not None and killed < 30, "the run ended before a worker could be killed"
    assert outcome["status"] == "succeeded", outcome
    assert len(read_jsonl(workers)) >= 4  # both ranks started twice
    assert outcome["params_sha256"] == uninterrupted["params_sha256"]
    steps = [r["step"] for r in read_jsonl(metrics)]
    assert steps == list(range(1, 31))  # every step reported once, after the restart too


def test_a_reused_warm_worker_carries_nothing_from_the_job_before(two_worker_run, tmp_path):
    """Job B after job A in the same warm processes trains exactly as B alone in new ones
    (the module's Ray Train run): a new model, optimizer, data order, RNG and process
    group each job. A differs from B in every way the spec allows here."""
    _, alone = two_worker_run
    a = {
        **SPEC,
        "optimizer": {"name": "lamb", "lr": 0.003},
        "zero_stage": 1,
        "seed": 7,
        "precision": "bf16",
        "max_steps": 6,
        "checkpoint_every": 0,
    }
    first = run_on_ray(TrainSpec.model_validate(a), tmp_path / "a", warm=True)
    assert first["status"] == "succeeded", first
    second = run_on_ray(TrainSpec.model_validate(SPEC), tmp_path / "b", warm=True)
    assert second["status"] == "succeeded", second
    pids = [{w["rank"]: w["pid"] for w in read_jsonl(tmp_path / d / "workers.jsonl")} for d in "ab"]
    assert pids[0] == pids[1], "B did not run in A's processes: nothing was reused"
    assert second["params_sha256"] == alone["params_sha256"]
    assert second["params_sha256"] != first["params_sha256"]


def test_two_worker_job_spreads_over_a_two_node_cluster(ray_session, tmp_path):
    # The session cluster is a head and a worker node, separate processes; STRICT_SPREAD
    # puts each training worker on its own node, and gloo joins them across nodes.
    deadline = time.monotonic() + 60
    while len([n for n in ray_session.nodes() if n["Alive"]]) < 2:
        assert time.monotonic() < deadline, "the second Ray node did not join"
        time.sleep(0.5)
    spec = TrainSpec.model_validate({**SPEC, "max_steps": 6, "checkpoint_every": 0})
    result = run_on_ray(spec, tmp_path, placement_strategy="STRICT_SPREAD")
    assert result["status"] == "succeeded", result
    nodes = {w["node"] for w in read_jsonl(tmp_path / "workers.jsonl")}
    assert len(nodes) == 2
