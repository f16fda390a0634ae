"""Elastic jobs through the service on the session's real Ray cluster (two nodes, 4 CPUs): a
job of 1 to 4 workers starts on what is free, grows when another job's workers free up,
is resized down and up by hand (API and CLI, which pins it: the scheduler no longer grows
it), every change an event with its reason, and every step's metrics are stored once."""

from __future__ import annotations

import pytest

from service.client import NestorError

from .live import TINY, wait_for

ELASTIC = {
    **TINY,
    "num_workers": {"min": 1, "max": 4},
    "micro_batch_size": 64,
    "max_steps": 5000,
    "eval_every": 100_000,
    "checkpoint_every": 100_000,  # only the resizes checkpoint
}


def resized(client, job_id: int) -> list[str]:
    return [e["reason"] for e in client.events(job_id) if e["status"] == "resized"]


def test_an_elastic_job_grows_shrinks_and_regrows_and_loses_no_step(service, capsys):
    from service.cli import main as nestor

    live, client = service
    blocker = client.submit({**TINY, "max_steps": 600, "eval_every": 100_000}, name="holds-2")
    wait_for(lambda: client.job(blocker["id"])["status"] == "running", timeout=180)
    job = client.submit(ELASTIC, name="elastic")
    # It starts on what is free (2 of 4 CPUs) rather than waiting for its max.
    wait_for(lambda: client.job(job["id"])["workers"] == 2, timeout=180)
    reasons = [e["reason"] for e in client.events(job["id"]) if e["status"] == "running"]
    assert reasons[-1] in ("training on 2 workers", "workers started on 2"), reasons

    # The other job ends: the scheduler hands its CPUs to the elastic job, which grows at
    # its next step boundary.
    assert client.wait(blocker["id"], timeout=240)["status"] == "succeeded"
    wait_for(lambda: client.job(job["id"])["workers"] == 4, timeout=180)
    assert resized(client, job["id"]) == ["2 -> 4 workers: capacity freed"]

    # By hand: down to 1 through the API, back up to 3 with the CLI.
    asked = client.resize(job["id"], 1)
    assert asked["status"] == "running"
    wait_for(lambda: client.job(job["id"])["workers"] == 1, timeout=180)
    base = ["--url", live.url, "--token", live.settings.admin_token]
    assert nestor(["resize", str(job["id"]), "3", *base]) == 0
    assert "will go on with 3 workers" in capsys.readouterr().err
    wait_for(lambda: client.job(job["id"])["workers"] == 3, timeout=180)
    assert resized(client, job["id"]) == [
        "2 -> 4 workers: capacity freed",
        "4 -> 1 workers: resized by admin",
        "1 -> 3 workers: resized by admin",
    ]

    # Outside its range, a fixed job, an ended one: each refused, naming why.
    with pytest.raises(NestorError) as e:
        client.resize(job["id"], 5)
    assert e.value.status == 422 and "outside job" in str(e.value) and "1 to 4" in str(e.value)
    with pytest.raises(NestorError) as e:
        client.resize(blocker["id"], 1)
    assert e.value.status == 422 and "fixed size" in str(e.value)

    # Every step it trained so far is stored once, across its four sizes; then it stops.
    client.cancel(job["id"])
    done = client.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled", done
    with pytest.raises(NestorError) as e:
        client.resize(job["id"], 2)
    assert e.value.status == 409 and "only a running job" in str(e.value)
    steps = client.metrics(job["id"], keys=["train_loss"], max_points=100_000)["series"]
    assert steps["train_loss"]["step"] == list(range(1, done["last_step"] + 1))
    assert done["last_step"] > 0
    for event in client.events(job["id"]):  # the timeline, for the record
        print(event["time"], event["status"], event["reason"])


def test_a_lost_node_shrinks_an_elastic_job_and_its_return_regrows_it(service, ray_cluster):
    """The session's worker node (2 of the 4 CPUs) killed mid-job: the job goes on at 2
    workers from its last checkpoint, and grows back to 4 when a node joins again."""
    _, client = service
    job = client.submit({**ELASTIC, "checkpoint_every": 200}, name="elastic-node")
    wait_for(lambda: client.job(job["id"])["workers"] == 4, timeout=180)
    wait_for(lambda: client.job(job["id"])["last_step"] >= 250, timeout=180)
    ray_cluster.kill_node()
    try:
        wait_for(lambda: client.job(job["id"])["workers"] == 2, timeout=240)
        assert client.job(job["id"])["status"] == "running"
    finally:
        ray_cluster.add_node(num_cpus=2)  # the session's other tests need it back
    wait_for(lambda: client.job(job["id"])["workers"] == 4, timeout=240)
    reasons = resized(client, job["id"])
    assert reasons[0] == "4 -> 2 workers: node lost", reasons
    assert reasons[1] == "2 -> 4 workers: capacity freed", reasons
    client.cancel(job["id"])
    done = client.wait(job["id"], timeout=120)
    # Steps after the last checkpoint before the loss ran again: each is stored once.
    steps = client.metrics(job["id"], keys=["train_loss"], max_points=100_000)["series"]
    assert steps["train_loss"]["step"] == list(range(1, done["last_step"] + 1))
    for event in client.events(job["id"]):
        print(event["time"], event["status"], event["reason"])


def test_a_higher_priority_job_preempts_lower_ones_which_resume_with_every_step(service):
    """The cluster full with two preemptible jobs (an elastic one on 2 workers, a fixed one
    on 2): a job of priority 10 needing 3 workers suspends the fixed one (it checkpoints and
    goes back to the queue) and shrinks the elastic one to its min; it runs; the suspended
    job then resumes where it stopped and finishes with every step once."""
    _, client = service
    elastic = client.submit(
        {**ELASTIC, "num_workers": {"min": 1, "max": 2}, "preemptible": True}, name="gives-1"
    )
    wait_for(lambda: client.job(elastic["id"])["workers"] == 2, timeout=180)
    fixed = client.submit(
        {**TINY, "max_steps": 3000, "eval_every": 100_000, "preemptible": True},
        name="suspended",
    )
    wait_for(lambda: client.job(fixed["id"])["last_step"] >= 100, timeout=180)
    urgent = client.submit(
        {**TINY, "num_workers": 3, "batch_size": 192, "micro_batch_size": 64, "max_steps": 50},
        name="urgent",
        priority=10,
    )
    assert client.wait(urgent["id"], timeout=300)["status"] == "succeeded"
    assert f"2 -> 1 workers: preempted by job {urgent['id']}" in resized(client, elastic["id"])
    done = client.wait(fixed["id"], timeout=300)
    assert done["status"] == "succeeded", done
    events = client.events(fixed["id"])
    back = [e for e in events if e["status"] == "queued" and "preempted" in (e["reason"] or "")]
    assert len(back) == 1, events
    assert back[0]["reason"].startswith(f"preempted by job {urgent['id']}: back in the queue at")
    steps = client.metrics(fixed["id"], keys=["train_loss"], max_points=100_000)["series"]
    assert steps["train_loss"]["step"] == list(range(1, 3001))
    client.cancel(elastic["id"])
    for event in events:
        print(event["time"], event["status"], event["reason"])
