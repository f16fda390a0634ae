"""Sweeps: expansion (grid, seeded random), validation naming the failing combination,
the summary, cancel, and max_concurrent in the scheduler."""

from __future__ import annotations

import math

import pytest

from service.models import Job, Sweep
from service.ray_jobs import RayJobs
from service.scheduler.asha import early_stop, stopper_for
from service.scheduler.queue import start_queued
from service.scheduler.reconcile import finish
from service.settings import Settings
from service.sweeps import SweepCreate, apply, combinations, create_sweep, update_sweep_status

from ..helpers import ingest, record_launches, scheduler_for, worker_token
from .test_api import SPEC

GRID = {
    "name": "lb",
    "base": SPEC,
    "search": "grid",
    "max_concurrent": 2,
    "space": {"optimizer.name": ["adan", "adamw", "lamb"], "batch_size": [256, 512]},
}


def test_grid_is_the_product_of_the_lists():
    combos = combinations(SweepCreate.model_validate(GRID))
    assert len(combos) == 6
    assert {(c["optimizer.name"], c["batch_size"]) for c in combos} == {
        (o, b) for o in ("adan", "adamw", "lamb") for b in (256, 512)
    }


def test_random_search_is_reproducible_from_its_seed_and_respects_bounds():
    body = {
        **GRID,
        "search": "random",
        "num_samples": 20,
        "seed": 7,
        "space": {
            "optimizer.lr": {"log_uniform": [1e-4, 1e-1]},
            "optimizer.weight_decay": {"uniform": [0.0, 0.1]},
            "optimizer.name": {"choice": ["adan", "lamb"]},
        },
    }
    a = combinations(SweepCreate.model_validate(body))
    b = combinations(SweepCreate.model_validate(body))
    c = combinations(SweepCreate.model_validate({**body, "seed": 8}))
    assert a == b and a != c and len(a) == 20
    assert all(1e-4 <= t["optimizer.lr"] <= 1e-1 for t in a)
    assert all(0.0 <= t["optimizer.weight_decay"] <= 0.1 for t in a)
    # log-uniform: about as many draws below the geometric midpoint as above it
    below = sum(t["optimizer.lr"] < math.sqrt(1e-5) for t in a)
    assert 4 <= below <= 16


def test_apply_sets_dotted_paths_without_touching_the_base():
    out = apply(SPEC, {"optimizer.lookahead": {"k": 5}, "batch_size": 512})
    assert out["optimizer"]["lookahead"] == {"k": 5} and out["batch_size"] == 512
    assert "lookahead" not in SPEC["optimizer"]


def test_create_sweep_queues_one_tagged_job_per_trial(client):
    resp = client.post("/v1/sweeps", json=GRID)
    assert resp.status_code == 201, resp.text
    sweep = resp.json()
    assert sweep["trials"] == 6 and sweep["status"] == "running"
    jobs = client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()
    assert jobs["count"] == 6 and all(j["status"] == "queued" for j in jobs["data"])
    detail = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert {t["varied"]["optimizer.name"] for t in detail["trials_summary"]} == {
        "adan",
        "adamw",
        "lamb",
    }


def test_an_invalid_combination_is_named_and_nothing_is_queued(client):
    bad = {**GRID, "space": {**GRID["space"], "batch_size": [256, 300]}}
    resp = client.post("/v1/sweeps", json=bad)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert detail["combination"] == {"optimizer.name": "adan", "batch_size": 300}
    assert "batch_size (300) must equal" in detail["errors"][0]["msg"]
    assert client.get("/v1/jobs").json()["count"] == 0
    assert client.get("/v1/sweeps").json()["count"] == 0


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"space": {"optimizer.lr": {"uniform": [0, 1]}}}, "grid search takes a list"),
        ({"search": "random", "space": {"optimizer.lr": {"normal": [0, 1]}}}, "distribution"),
        ({"space": {"batch_size": []}}, "non-empty list"),
        # Distributions with arguments they cannot draw from (each used to be a 500):
        ({"search": "random", "space": {"optimizer.lr": {"uniform": [1]}}}, "uniform takes"),
        ({"search": "random", "space": {"optimizer.lr": {"uniform": "ab"}}}, "uniform takes"),
        ({"search": "random", "space": {"optimizer.lr": {"uniform": [1, 0]}}}, "low < high"),
        ({"search": "random", "space": {"optimizer.lr": {"choice": []}}}, "choice takes"),
        (
            {"search": "random", "space": {"optimizer.lr": {"log_uniform": [0, 1]}}},
            "0 < low < high",
        ),
        ({"search": "random", "space": {"seed": {"uniform": [0, True]}}}, "uniform takes"),
    ],
)
def test_bad_spaces_are_422(client, change, text):
    resp = client.post("/v1/sweeps", json={**GRID, **change})
    assert resp.status_code == 422 and text in str(resp.json()["detail"])


def test_non_finite_numbers_anywhere_in_a_sweep_are_422_and_nothing_is_stored(client):
    """1e999 parses as infinity: stored as-is on SQLite, a 500 on PostgreSQL."""
    import json

    base = json.dumps(SPEC).replace('"lr": 0.01', '"lr": 1e999')  # replaced by the space
    body = '{"name": "inf", "base": ' + base + ', "space": {"optimizer.lr": [0.01, 0.02]}}'
    resp = client.post("/v1/sweeps", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "base"]
    assert "optimizer.lr: inf is not a finite number" in error["msg"]
    assert client.get("/v1/sweeps").json()["count"] == 0


def test_summary_sorts_by_a_final_metric_and_cancel_cancels_trials(client):
    sweep = client.post("/v1/sweeps", json=GRID).json()
    jobs = client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"]
    for i, job in enumerate(jobs[:3]):
        points = [{"step": s, "values": {"val_loss": 10.0 - s - i}} for s in (1, 2)]
        ingest(client, job["id"], {"points": points})
    detail = client.get(
        f"/v1/sweeps/{sweep['id']}", params={"sort": "val_loss", "order": "asc"}
    ).json()
    finals = [t["final"].get("val_loss") for t in detail["trials_summary"]]
    assert finals[:3] == [6.0, 7.0, 8.0] and finals[3:] == [None, None, None]
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 200
    statuses = {
        j["status"] for j in client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"]
    }
    assert statuses == {"cancelled"}
    with client.app.state.db.sessions() as db:
        row = db.get(Sweep, sweep["id"])
        update_sweep_status(db, row)
        assert row.status == "cancelled"
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 409


def test_scheduler_respects_max_concurrent(tmp_path):
    scheduler, db = scheduler_for(tmp_path, cpus=16)
    launched, record = record_launches()
    with db.sessions() as s:
        create_sweep(s, SweepCreate.model_validate(GRID))  # 6 trials, max_concurrent 2
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert len(launched) == 2  # CPUs for all six, but the sweep allows two at once
        waiting = s.query(Job).filter(Job.submission_id.is_(None)).all()
        assert {j.pending_reason for j in waiting} == {"its sweep runs 2 trials at a time"}
        first = s.get(Job, launched[0])
        first.status = "succeeded"
        s.commit()
        start_queued(s, capacity=scheduler.capacity, launch=record)
        assert len(launched) == 3


@pytest.mark.parametrize("name", ["sweep-large-batch-small.json", "sweep-large-batch-cluster.json"])
def test_example_sweeps_expand_to_valid_trials(name):
    import json
    from pathlib import Path

    from service.sweeps import expand

    body = json.loads((Path(__file__).parents[2] / "examples" / name).read_text())
    trials = expand(SweepCreate.model_validate(body))
    names = {spec.optimizer.name for _, spec in trials}
    assert names == {"adan", "adamw", "lamb"} and len(trials) >= 9


def test_cli_sweep_reports_a_missing_or_invalid_file(tmp_path, capsys):
    from service.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", str(tmp_path / "nope.json")])
    assert "sweep file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit):
        main(["sweep", str(bad)])
    assert "not valid JSON" in capsys.readouterr().err


def test_asha_stops_the_diverging_trials_and_keeps_their_metrics(client, tmp_path):
    """Optuna's SuccessiveHalvingPruner decides; Ray's stop is recorded instead of sent."""
    body = {
        **GRID,
        "max_concurrent": 4,
        "space": {"optimizer.lr": [0.001, 0.002, 5.0, 9.0]},
        "early_stopping": {
            "metric": "val_loss",
            "mode": "min",
            "grace_period": 2,
            "reduction_factor": 2,
        },
    }
    sweep = client.post("/v1/sweeps", json=body).json()
    jobs = sorted(
        client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"], key=lambda j: j["id"]
    )
    db = client.app.state.db
    settings = Settings(home=tmp_path, optuna_url=f"sqlite:///{tmp_path / 'optuna.db'}")
    stopper = stopper_for(settings.optuna_db_url)
    stopped = []
    ray = RayJobs("http://127.0.0.1:1")  # never started: only stop() is called
    ray.stop = lambda submission_id: stopped.append(int(submission_id.removeprefix("test-")))
    losses = {0: 1.0, 1: 0.9, 2: 50.0, 3: 80.0}  # the large learning rates diverge
    with db.sessions() as s:
        for i, job in enumerate(jobs):
            row = s.get(Job, job["id"])
            row.status, row.submission_id = "running", f"test-{row.id}"
            s.commit()
            points = [
                {"step": step, "values": {"val_loss": losses[i] + 1.0 / step}}
                for step in range(1, 5)
            ]
            ingest(client, row.id, {"points": points})
            early_stop(s, stopper=stopper, ray=ray)  # trials report in turn, as they would live
        assert sorted(stopped) == [jobs[2]["id"], jobs[3]["id"]]
        for job_id in stopped:  # what reconcile does once Ray reports the job STOPPED
            row = s.get(Job, job_id)
            assert "stopped early by ASHA" in row.stop_reason
            finish(s, row, "stopped_early", row.stop_reason, backfill_with=db.sessions)
    trial = client.get(f"/v1/jobs/{jobs[2]['id']}").json()
    assert trial["status"] == "stopped_early"
    kept = client.get(f"/v1/jobs/{jobs[2]['id']}/metrics", params={"keys": "val_loss"}).json()
    assert kept["series"]["val_loss"]["step"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"space": {}, "points": []}, "give a space, points, or both"),
        ({"points": [{"batch_size": 256}]}, "['batch_size'] also in space"),
        ({"points": [{}]}, "points[0]: an empty combination"),
    ],
)
def test_bad_points_are_422(client, change, text):
    resp = client.post("/v1/sweeps", json={**GRID, **change})
    assert resp.status_code == 422 and text in str(resp.json()["detail"])


def test_points_are_crossed_with_the_space():
    body = {
        **GRID,
        "points": [
            {"batch_size": 256, "optimizer.lr": 0.01},
            {"batch_size": 512, "optimizer.lr": 0.03},
        ],
        "space": {"seed": [0, 1, 2]},
    }
    combos = combinations(SweepCreate.model_validate(body))
    assert combos == [
        {"batch_size": b, "optimizer.lr": lr, "seed": s}
        for b, lr in ((256, 0.01), (512, 0.03))
        for s in (0, 1, 2)
    ]


# Steps to the target per (batch, lr, seed); None: never reached. Best lrs: 0.01 at 256 (0.03
# has a seed that never reached), 0.03 at 512 (inside the grid), 0.1 at 1024 (its edge).
REACHED = {
    (256, 0.01): (400, 420),
    (256, 0.03): (300, None),
    (256, 0.1): (None, None),
    (512, 0.01): (260, 280),
    (512, 0.03): (150, 170),
    (512, 0.1): (200, 190),
    (1024, 0.01): (250, 250),
    (1024, 0.03): (120, 110),
    (1024, 0.1): (90, 100),
}


def test_cells_give_steps_to_target_and_the_recipe_fits_the_best_lrs(client):
    """Trials report their reached step on success; the sweep summarises steps to the
    target per cell (median over seeds, only when every seed reached it) and the best lr,
    and the recipe is the least-squares line through the best lrs in log-log space
    (computed independently here with numpy)."""
    np = pytest.importorskip("numpy")
    body = {
        "name": "targets",
        "base": {**SPEC, "stop_at": {"metric": "val_accuracy", "value": 0.9}},
        "points": [{"batch_size": b, "optimizer.lr": lr} for b, lr in REACHED],
        "space": {"seed": [0, 1]},
        "max_concurrent": 18,
    }
    sweep = client.post("/v1/sweeps", json=body).json()
    jobs = client.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["data"]

    def finish(job_id: int, final: dict) -> None:
        token = {"Authorization": f"Bearer {worker_token(client.app, job_id)}"}
        url = f"/v1/jobs/{job_id}/ingest"
        assert client.post(url, json={"status": "running"}, headers=token).status_code == 200
        assert client.post(url, json=final, headers=token).status_code == 200

    lost = None
    for job in jobs:
        spec = job["spec"]
        key = (spec["batch_size"], spec["optimizer"]["lr"])
        reached = REACHED[key][spec["seed"]]
        if key == (512, 0.1) and spec["seed"] == 0:  # its worker died; retried below
            finish(job["id"], {"status": "failed", "error": "worker died"})
            lost = job["id"]
            continue
        finish(job["id"], {"status": "succeeded", "reached_target_at_step": reached})
        shown = client.get(f"/v1/jobs/{job['id']}").json()
        assert (shown["status"], shown["reached_target_at_step"]) == ("succeeded", reached)
    retry = client.post(f"/v1/jobs/{lost}/retry").json()
    finish(retry["id"], {"status": "succeeded", "reached_target_at_step": 200})
    first = min(j["id"] for j in jobs)  # batch 256, lr 0.01, seed 0
    events = client.get(f"/v1/jobs/{first}/events/history").json()
    assert "val_accuracy >= 0.9 reached at step 400" in events[-1]["reason"]

    detail = client.get(f"/v1/sweeps/{sweep['id']}").json()
    cells = {c["batch_size"]: c for c in detail["cells"]}
    assert {c["optimizer"] for c in detail["cells"]} == {"adan"} and set(cells) == {256, 512, 1024}
    rows = {b: {r["lr"]: r for r in c["lrs"]} for b, c in cells.items()}
    assert rows[256][0.01]["steps"] == [400, 420] and rows[256][0.01]["steps_to_target"] == 410
    assert rows[256][0.03]["steps_to_target"] is None  # seed 1 never reached the target
    # The retry replaced the trial that failed: one trial per seed, the latest.
    assert rows[512][0.1]["steps"] == [200, 190] and retry["id"] in rows[512][0.1]["job_ids"]
    assert lost not in rows[512][0.1]["job_ids"]
    assert [(cells[b]["best_lr"], cells[b]["steps_to_target"]) for b in (256, 512, 1024)] == [
        (0.01, 410),
        (0.03, 160),
        (0.1, 95),
    ]
    assert [cells[b]["best_on_edge"] for b in (256, 512, 1024)] == [True, False, True]
    assert cells[1024]["spread"] == [90, 100]

    recipe = client.get(f"/v1/sweeps/{sweep['id']}/recipe", params={"batch_size": 4096}).json()
    (fit,) = recipe["recipes"]
    x = np.log(np.array([256, 512, 1024]) / 256)
    y = np.log([0.01, 0.03, 0.1])
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.sqrt(np.mean(((y - (intercept + slope * x)) / np.log(10)) ** 2))
    assert fit["exponent"] == pytest.approx(slope)
    assert fit["lr_ref"] == pytest.approx(np.exp(intercept)) and fit["batch_ref"] == 256
    assert fit["residual"] == pytest.approx(residual)
    assert fit["suggested_lr"] == pytest.approx(np.exp(intercept + slope * np.log(16)))
    assert [p["best_lr"] for p in fit["points"]] == [0.01, 0.03, 0.1]
    bad = client.get(f"/v1/sweeps/{sweep['id']}/recipe", params={"batch_size": 0})
    assert bad.status_code == 422 and "batch_size" in str(bad.json()["detail"])
