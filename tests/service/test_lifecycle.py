"""The service end to end on a real local Ray: a job runs, is cancelled, and survives an
API server restart with no metric point lost."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time

from .live import TINY, wait_for, wait_for_sweep


def test_job_runs_to_success_with_metrics_and_events(service):
    _, client = service
    job = client.submit(TINY, name="tiny")
    done = client.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    assert done["workers"] == 2  # a fixed job's size, recorded at launch
    losses = client.metrics(job["id"], keys=["train_loss"])["series"]["train_loss"]
    assert losses["step"] == list(range(1, 21))
    assert [e["status"] for e in client.events(job["id"])] == ["queued", "running", "succeeded"]


def test_cancel_stops_a_running_job(service):
    _, client = service
    job = client.submit({**TINY, "max_steps": 100000}, name="long")
    wait_for(lambda: client.job(job["id"])["last_step"] >= 2)
    client.cancel(job["id"])
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "cancelled"


def test_a_steady_jobs_end_and_the_start_of_the_job_behind_it_are_estimated(service):
    """A 2-worker job on the 4-CPU cluster, a 4-worker job queued behind it: mid-run, the
    running job's estimated end and the queued job's estimated start are each within 30% of
    the time then left (plus the scheduler's few seconds) of what happened."""
    from datetime import datetime

    from service.client import NestorError

    _, client = service
    first = client.submit({**TINY, "max_steps": 2000, "eval_every": 10_000}, name="steady")
    wait_for(lambda: client.job(first["id"])["status"] == "running", timeout=180)
    behind = client.submit({**TINY, "num_workers": 4, "micro_batch_size": 64}, name="behind")
    try:
        wait_for(lambda: client.job(first["id"])["last_step"] >= 200, timeout=240)
        seen = time.time()
        running, queued = client.job(first["id"]), client.job(behind["id"])
        assert running["steps_per_second"] > 0 and 0 < running["progress"] < 1
        assert queued["queue_position"] == 1 and queued["status"] == "queued"
        end = datetime.fromisoformat(running["estimated_end"]).timestamp()
        start = datetime.fromisoformat(queued["estimated_start"]).timestamp()
        assert abs(start - end) < 2  # it starts when the running job frees its CPUs
        done = client.wait(first["id"], timeout=600)
        assert done["status"] == "succeeded"
        wait_for(lambda: client.job(behind["id"])["status"] != "queued", timeout=120)
        started = datetime.fromisoformat(client.job(behind["id"])["started_at"]).timestamp()
    finally:
        with contextlib.suppress(NestorError):  # it may have ended already
            client.cancel(behind["id"])
    finished = datetime.fromisoformat(done["finished_at"]).timestamp()
    left = finished - seen
    print(
        f"estimates at step {running['last_step']}: end {end - seen:.1f} s, start "
        f"{start - seen:.1f} s; it ended after {left:.1f} s, the next started after "
        f"{started - seen:.1f} s"
    )
    assert abs(end - finished) <= 0.3 * left + 3, (end - seen, left)
    assert abs(start - started) <= 0.3 * left + 6, (start - seen, started - seen)


def test_api_restart_mid_job_loses_no_metric_point(service):
    """The live path alone: the end-of-job backfill from metrics.jsonl is off after the
    restart, so every point must have come through the reporter's buffer and retries."""
    live, client = service
    job = client.submit({**TINY, "max_steps": 150}, name="restart")
    wait_for(lambda: client.job(job["id"])["last_step"] >= 3)
    live.stop()
    time.sleep(3)  # the job keeps training; its reporter buffers and retries
    settings = live.settings
    live.settings = settings.model_copy(update={"backfill": False})
    try:
        live.start()
        done = client.wait(job["id"], timeout=240)
    finally:
        live.stop()
        live.settings = settings
        live.start()
    assert done["status"] == "succeeded"
    steps = client.metrics(job["id"], keys=["train_loss"], max_points=10_000)
    assert steps["series"]["train_loss"]["step"] == list(range(1, 151))


def test_jobs_the_cluster_can_never_run_are_refused_at_submit(service):
    """The session's cluster is the embedded kind (it cannot grow): 4 CPUs, no GPU."""
    from service.client import NestorError

    _, client = service
    for change, field, text in [
        ({"num_workers": 8, "batch_size": 1024}, "num_workers", "needs 8 CPUs, the cluster has 4"),
        ({"use_gpu": True}, "use_gpu", "needs 2 GPUs (use_gpu), the cluster has none"),
    ]:
        try:
            client.submit({**TINY, **change}, name="too big")
            raise AssertionError("accepted")
        except NestorError as e:
            assert e.status == 422
            (error,) = e.detail
            assert error["loc"] == ["body", "spec", field] and text in error["msg"]
    sweep = {"name": "big", "base": TINY, "space": {"num_workers": [2, 8]}}
    sweep["base"] = {**TINY, "batch_size": 1024}
    try:
        client.sweep(sweep)
        raise AssertionError("accepted")
    except NestorError as e:
        assert e.status == 422 and e.detail["combination"] == {"num_workers": 8}
    assert all(j["name"] != "too big" for j in client.jobs()["data"])


def test_grid_sweep_runs_every_trial_within_max_concurrent(service):
    _, client = service
    base = {**TINY, "max_steps": 8, "eval_every": 4}
    sweep = client.sweep(
        {
            "name": "grid",
            "base": base,
            "max_concurrent": 1,
            "space": {"optimizer.name": ["adan", "adamw", "lamb"]},
        }
    )
    assert sweep["trials"] == 3

    done = wait_for_sweep(client, sweep["id"])
    assert done["status"] == "succeeded"
    assert {t["status"] for t in done["trials_summary"]} == {"succeeded"}
    assert {t["varied"]["optimizer.name"] for t in done["trials_summary"]} == {
        "adan",
        "adamw",
        "lamb",
    }
    assert all("val_loss" in t["final"] for t in done["trials_summary"])
    # max_concurrent = 1: no two trials' [started, finished] intervals overlap.
    jobs = sorted(
        (client.job(t["job_id"]) for t in done["trials_summary"]), key=lambda j: j["started_at"]
    )
    for a, b in itertools.pairwise(jobs):
        assert a["finished_at"] <= b["started_at"], (a, b)


def test_sweep_survives_an_api_restart(service):
    live, client = service
    base = {**TINY, "max_steps": 60, "eval_every": 20}
    sweep = client.sweep(
        {
            "name": "restart",
            "base": base,
            "max_concurrent": 1,
            "space": {"optimizer.name": ["adan", "lamb"]},
        }
    )
    first = wait_for(
        lambda: [
            t for t in client.sweep_detail(sweep["id"])["trials_summary"] if t["last_step"] >= 2
        ]
    )
    live.stop()  # mid-trial: one running, one still queued
    time.sleep(2)
    live.start()
    done = wait_for_sweep(client, sweep["id"])
    assert done["status"] == "succeeded"
    assert [t["status"] for t in done["trials_summary"]] == ["succeeded", "succeeded"]
    assert first[0]["job_id"] in [t["job_id"] for t in done["trials_summary"]]
    assert all(t["last_step"] == 60 for t in done["trials_summary"])


def test_asha_stops_the_diverging_trials_of_a_sweep(service):
    """Two learning rates that train and two that blow the loss up (finite, so the trials are
    not failed by the NaN policy): ASHA stops the blown-up ones at their first rungs against the
    curves of the good ones, and their metrics stay."""
    _, client = service
    base = {
        **TINY,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "num_workers": 1,
        "micro_batch_size": 256,
        "max_steps": 1500,  # long enough that a stop lands before a bad trial could end
        "eval_every": 10,
    }
    sweep = client.sweep(
        {
            "name": "asha",
            "base": base,
            "max_concurrent": 2,
            "space": {"optimizer.lr": [0.003, 0.01, 3.0, 5.0]},
            "early_stopping": {
                "metric": "val_loss",
                "mode": "min",
                "grace_period": 10,
                "reduction_factor": 2,
            },
        }
    )
    done = wait_for_sweep(client, sweep["id"], timeout=600)
    by_lr = {t["varied"]["optimizer.lr"]: t for t in done["trials_summary"]}
    for lr in (3.0, 5.0):
        trial = by_lr[lr]
        assert trial["status"] == "stopped_early", trial
        assert trial["last_step"] < 1500
        job = client.job(trial["job_id"])
        assert "stopped early by ASHA at step 10:" in job["stop_reason"], job["stop_reason"]
        kept = client.metrics(trial["job_id"], keys=["val_loss"])["series"]["val_loss"]
        assert kept["step"] and kept["step"][0] == 10
    # The good trials meet only each other at their rungs, so at least one runs to the end.
    good = [by_lr[lr] for lr in (0.003, 0.01)]
    assert any(t["status"] == "succeeded" and t["last_step"] == 1500 for t in good), good
    assert done["status"] == "succeeded"


def test_a_second_ray_on_the_machine_does_not_take_the_services_jobs(service, tmp_path):
    """A Ray job's driver joins "the cluster this machine started last" as Ray's shared
    /tmp/ray names it. Started after the service's cluster, a private Ray (what `nestor
    train` starts) used to receive the service's next jobs: their drivers connected to it
    and their warm workers died with it. The service's cluster keeps its own temp dir."""
    live, client = service
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, sys, time; ray.init(address='local', num_cpus=1, "
            "include_dashboard=False); print(ray.get_runtime_context().gcs_address, "
            "flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        other_gcs = other.stdout.readline().strip()
        assert other_gcs and other_gcs != live.cluster.gcs_address
        job = client.submit(TINY, name="beside another ray")
        done = client.wait(job["id"], timeout=240)
        assert done["status"] == "succeeded", done
        joined = [
            line.split("at address: ")[1].split("...")[0]
            for line in client.logs(job["id"])["lines"]
            if "Connecting to existing Ray cluster at address: " in line
        ]
        service_port = live.cluster.gcs_address.rsplit(":", 1)[1]
        assert joined and {a.rsplit(":", 1)[1] for a in joined} == {service_port}, joined
    finally:
        other.kill()
        other.wait()
