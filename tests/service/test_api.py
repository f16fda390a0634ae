"""The REST API on SQLite and PostgreSQL: jobs, validation, auth, ingest, downsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.downsample import min_max_downsample

from ..helpers import worker_token

SPEC = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 1000},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 128,
    "num_workers": 1,
    "max_steps": 5,
}


def submit(client, **kw):
    resp = client.post("/v1/jobs", json={"name": "t", "spec": SPEC, **kw})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_health_needs_no_token_everything_else_does(client):
    anon = {"Authorization": ""}
    assert client.get("/healthz", headers=anon).json() == {"status": "ok"}
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/1"),
        ("get", "/metrics"),
        ("get", "/v1/jobs/1/metrics"),
    ]:
        assert getattr(client, method)(path, headers=anon).status_code == 401
    bad = {"Authorization": "Bearer nst_wrong"}
    assert (
        "invalid, revoked or expired token" in client.get("/v1/jobs", headers=bad).json()["detail"]
    )


def test_job_lifecycle_queued_cancel_retry(client):
    job = submit(client, priority=5)
    assert (
        job["status"] == "queued" and job["priority"] == 5 and job["spec"]["model"] == "mnist1d-mlp"
    )
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "is cancelled" in again.json()["detail"]
    retried = client.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 201 and retried.json()["status"] == "queued"
    events = client.get(f"/v1/jobs/{job['id']}/events/history").json()
    assert [e["status"] for e in events] == ["queued", "cancelled"]


def test_list_filters_and_pages(client):
    ids = [submit(client)["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2, "skip": 1}).json()
    assert page["count"] == 5 and [j["id"] for j in page["data"]] == [ids[3], ids[2]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


@pytest.mark.parametrize(
    ("change", "loc", "text"),
    [
        ({"batch_size": 300}, ["body", "spec"], "batch_size (300) must equal"),
        (
            {"optimizer": {"name": "sgd"}},
            ["body", "spec", "optimizer", "name"],
            "Unknown optimizer name",
        ),
        ({"model": "gpt5"}, ["body", "spec", "model"], "unknown model 'gpt5'"),
        ({"code": "import os"}, ["body", "spec", "code"], "should match pattern"),
    ],
)
def test_invalid_specs_get_422_with_the_field_path(client, change, loc, text):
    resp = client.post("/v1/jobs", json={"name": "bad", "spec": {**SPEC, **change}})
    assert resp.status_code == 422
    err = resp.json()["detail"][0]
    assert err["loc"][: len(loc)] == loc and text in err["msg"]
    assert client.get("/v1/jobs").json()["count"] == 0  # nothing stored


def test_unknown_ids_404_and_oversized_bodies_413(client):
    assert client.get("/v1/jobs/999").status_code == 404
    assert client.post("/v1/jobs/999/cancel").json()["detail"] == "job 999 not found"
    huge = {"name": "x" * (2 << 20), "spec": SPEC}
    assert client.post("/v1/jobs", json=huge).status_code == 413


def test_ingest_is_idempotent_scoped_and_moves_status(client):

    job = submit(client)
    other = submit(client)
    worker = worker_token(client.app, job["id"])
    headers = {"Authorization": f"Bearer {worker}"}
    batch = {
        "points": [{"step": s, "values": {"train_loss": 1.0 / s, "lr": 0.1}} for s in range(1, 11)],
        "status": "running",
    }
    assert client.post(f"/v1/jobs/{job['id']}/ingest", json=batch, headers=headers).json() == {
        "accepted": 20
    }
    client.post(f"/v1/jobs/{job['id']}/ingest", json=batch, headers=headers)  # re-sent
    series = client.get(f"/v1/jobs/{job['id']}/metrics", params={"keys": "train_loss"}).json()
    assert series["series"]["train_loss"]["step"] == list(range(1, 11))
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    assert (
        client.post(f"/v1/jobs/{other['id']}/ingest", json=batch, headers=headers).status_code
        == 403
    )
    assert client.get("/v1/jobs", headers=headers).status_code == 403  # workers only ingest
    done = client.post(
        f"/v1/jobs/{job['id']}/ingest", json={"status": "succeeded"}, headers=headers
    )
    assert done.status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_metrics_are_downsampled_keeping_extremes(client):

    job = submit(client)
    worker = worker_token(client.app, job["id"])
    values = np.sin(np.arange(20_000) / 100.0)
    values[12_345] = 50.0  # a spike must survive
    points = [{"step": i + 1, "values": {"loss": float(v)}} for i, v in enumerate(values)]
    for i in range(0, len(points), 5000):
        client.post(
            f"/v1/jobs/{job['id']}/ingest",
            json={"points": points[i : i + 5000]},
            headers={"Authorization": f"Bearer {worker}"},
        )
    s = client.get(f"/v1/jobs/{job['id']}/metrics", params={"max_points": 200}).json()
    loss = s["series"]["loss"]
    assert len(loss["step"]) <= 200 and 50.0 in loss["value"]
    assert loss["step"] == sorted(loss["step"])


def test_min_max_downsample_unit():
    steps = np.arange(1, 1_000_001)
    values = np.random.default_rng(0).normal(size=1_000_000)
    s, v = min_max_downsample(steps, values, 1000)
    assert len(s) <= 1000 and values.max() in v and values.min() in v


def test_sql_downsampling_equals_the_numpy_reference(client):
    """The database computes exactly the reference's points: gaps in the steps, NaN holes,
    ties (the first step wins), a constant stretch and a spike."""
    from service.downsample import query_series

    job = submit(client)
    rng = np.random.default_rng(1)
    steps = np.sort(rng.choice(np.arange(1, 30_000), size=9_000, replace=False))
    values = np.round(rng.normal(size=len(steps)), 1)  # rounding makes ties common
    values[rng.choice(len(steps), 300, replace=False)] = np.nan
    values[4000:4500] = 0.25
    values[7777] = 1e6
    worker = worker_token(client.app, job["id"])
    points = [
        {"step": int(st), "values": {"loss": None if np.isnan(v) else float(v)}}
        for st, v in zip(steps, values, strict=True)
    ]
    for i in range(0, len(points), 5000):
        client.post(
            f"/v1/jobs/{job['id']}/ingest",
            json={"points": points[i : i + 5000]},
            headers={"Authorization": f"Bearer {worker}"},
        )
    for max_points in (2, 7, 100, 1000, 8999):
        want_s, want_v = min_max_downsample(steps, values, max_points)
        with client.app.state.db.sessions() as db:
            got_s, got_v = query_series(db, job["id"], "loss", max_points)
        assert got_s == want_s.tolist() and got_v == want_v.tolist(), max_points
    with client.app.state.db.sessions() as db:  # short enough: returned whole, NULLs kept
        got_s, got_v = query_series(db, job["id"], "loss", 9000)
    assert got_s == steps.tolist()
    assert sum(v is None for v in got_v) == np.isnan(values).sum() > 0


def test_prometheus_metrics(client):
    submit(client)
    text = client.get("/metrics").text
    assert 'nestor_jobs{status="queued"} 1.0' in text and "nestor_queue_length 1.0" in text


def test_out_of_range_ids_and_non_finite_values_are_422_not_500(client):
    assert client.get(f"/v1/jobs/{2**70}").status_code == 422
    assert client.post(f"/v1/jobs/{2**70}/cancel").status_code == 422
    job = submit(client)
    bad = '{"points": [{"step": 1, "values": {"loss": NaN}}]}'
    resp = client.post(
        f"/v1/jobs/{job['id']}/ingest", content=bad, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    huge_step = {"points": [{"step": 2**40, "values": {"loss": 1.0}}]}
    assert client.post(f"/v1/jobs/{job['id']}/ingest", json=huge_step).status_code == 422


def test_paging_beyond_64_bits_is_422(client):
    assert client.get("/v1/jobs", params={"skip": 2**70}).status_code == 422
    assert client.get("/v1/sweeps", params={"skip": 2**70}).status_code == 422


def test_jobs_carry_their_latest_loss_and_accuracy(client):

    quiet, busy = submit(client), submit(client)
    worker = worker_token(client.app, busy["id"])
    points = [
        {"step": 1, "values": {"train_loss": 2.0, "val_accuracy": 0.5}},
        {"step": 2, "values": {"train_loss": 1.5, "lr": 0.1}},
        {"step": 3, "values": {"train_loss": None}},  # a non-finite loss arrives as null
    ]
    client.post(
        f"/v1/jobs/{busy['id']}/ingest",
        json={"points": points},
        headers={"Authorization": f"Bearer {worker}"},
    )
    listed = {j["id"]: j["latest"] for j in client.get("/v1/jobs").json()["data"]}
    assert listed[busy["id"]] == {"train_loss": None, "val_accuracy": 0.5}
    assert listed[quiet["id"]] == {}
    assert client.get(f"/v1/jobs/{busy['id']}").json()["latest"] == listed[busy["id"]]


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ('"optimizer": {"name": "adan", "lr": 1e999}', ["optimizer", "lr"]),
        ('"optimizer": {"name": "adan", "lr": 0.01, "betas": [0.9, 1e999, 0.9]}', ["optimizer"]),
        ('"max_grad_norm": 1e999', ["max_grad_norm"]),
        ('"epochs": -1e999', ["epochs"]),
        ('"lr_schedule": {"min_lr_ratio": 1e999}', ["lr_schedule", "min_lr_ratio"]),
    ],
)
def test_non_finite_numbers_in_a_spec_are_422_on_every_database(client, raw, loc):
    """1e999 parses as infinity: it used to be stored as-is on SQLite and a 500 on
    PostgreSQL."""
    spec = {k: v for k, v in SPEC.items() if k != "optimizer"}
    body = '{"name": "inf", "spec": {' + json.dumps(spec)[1:-1] + ", " + raw + "}}"
    resp = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"][2 : 2 + len(loc)] == loc
    assert client.get("/v1/jobs").json()["count"] == 0


@pytest.mark.parametrize(
    ("optimizer", "field"),
    [
        ({"name": "adan", "lr": 1e6}, "lr"),
        ({"name": "adamw", "weight_decay": 1e3}, "weight_decay"),
        ({"name": "lamb", "eps": 2.0}, "eps"),
        ({"name": "adan", "max_grad_norm": 1e9}, "max_grad_norm"),
        ({"name": "adan", "lookahead": {"k": 10**9}}, "lookahead"),
        ({"name": "adan", "state_precision": "int4"}, "state_precision"),
    ],
)
def test_hyperparameters_have_upper_bounds(client, optimizer, field):
    resp = client.post("/v1/jobs", json={"name": "big", "spec": {**SPEC, "optimizer": optimizer}})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][:4] == ["body", "spec", "optimizer", field]


def test_retrying_a_job_with_a_200_character_name_keeps_the_name_within_bounds(client):
    """The retry's name used to grow past the column (a 500 on PostgreSQL)."""
    job = submit(client, name="n" * 200)
    for _ in range(2):
        job = client.post(f"/v1/jobs/{job['id']}/retry").json()
        assert len(job["name"]) == 200 and job["name"].endswith(")")
    assert client.get("/v1/jobs").json()["count"] == 3


def test_a_restart_without_a_checkpoint_discards_the_crashed_attempts_points(client):

    job = submit(client)
    worker = worker_token(client.app, job["id"])
    headers = {"Authorization": f"Bearer {worker}"}
    first = [{"step": s, "values": {"train_loss": 9.0}} for s in range(1, 11)]
    client.post(f"/v1/jobs/{job['id']}/ingest", json={"points": first}, headers=headers)
    again = [{"step": s, "values": {"train_loss": 1.0}} for s in (1, 2)]
    client.post(
        f"/v1/jobs/{job['id']}/ingest",
        json={"resume_from_step": 0, "points": again},
        headers=headers,
    )
    series = client.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]["train_loss"]
    assert series == {"step": [1, 2], "value": [1.0, 1.0]}
    assert client.get(f"/v1/jobs/{job['id']}").json()["last_step"] == 2
    reasons = [e["reason"] for e in client.get(f"/v1/jobs/{job['id']}/events/history").json()]
    assert "workers restarted: 10 points after step 0 discarded" in reasons[-1]


def test_a_point_repeated_within_one_batch_keeps_its_last_value(client):
    """PostgreSQL stores a batch in one statement, which may not update a row twice."""

    job = submit(client)
    worker = worker_token(client.app, job["id"])
    points = [
        {"step": 1, "values": {"loss": 3.0, "lr": None}},
        {"step": 2, "values": {"loss": 2.0}},
        {"step": 1, "values": {"loss": 1.0}},
    ]
    resp = client.post(
        f"/v1/jobs/{job['id']}/ingest",
        json={"points": points},
        headers={"Authorization": f"Bearer {worker}"},
    )
    assert resp.status_code == 200
    series = client.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]
    assert series["loss"] == {"step": [1, 2], "value": [1.0, 2.0]}
    assert series["lr"] == {"step": [1], "value": [None]}
