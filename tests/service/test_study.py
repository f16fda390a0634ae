"""The large-batch study in miniature through the live service on the real Ray cluster (the
same sweep file as docs/large-batch, shrunk), and the AMSGrad paper's synthetic problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from studies import large_batch
from studies.amsgrad_synthetic import run

from .live import wait_for_sweep

STUDY = Path(__file__).parents[2] / "docs" / "large-batch"


def test_miniature_study_has_every_cell(service):
    _, client = service
    sweep = json.loads((STUDY / "lr-search.json").read_text())
    mini = copy.deepcopy(sweep)
    mini["name"] = "mini study"
    mini["base"].update(
        {"dataset": {"name": "mnist1d", "num_samples": 1200}, "epochs": 1, "num_workers": 1}
    )
    mini["base"]["micro_batch_size"] = 128
    # Two of the study's optimizers at one learning rate each (the study searches three),
    # two batch sizes: four trials, each cell of the tables filled.
    seen, optimizers = set(), []
    for opt in sweep["space"]["optimizer"]:
        label = large_batch.optimizer_label({"optimizer": opt})
        if label not in seen and len(seen) < 2:
            seen.add(label)
            optimizers.append(opt)
    mini["space"] = {"optimizer": optimizers, "batch_size": [128, 256]}
    mini["max_concurrent"] = 4

    created = client.sweep(mini)
    done = wait_for_sweep(client, created["id"], timeout=500)
    assert done["status"] == "succeeded", done

    rows = large_batch.trials(client, created["id"])
    table = large_batch.cells(rows)
    assert set(table) == {(o, b) for o in seen for b in (128, 256)}
    assert {t["job"]["spec"]["max_steps"] for t in rows} == {9, 5}  # ceil(1080 / b): 1 epoch
    text = large_batch.markdown_table(table)
    assert text.count("\n") == 1 + len(seen) and "–" not in text
    assert set(large_batch.pick_lr(rows)) == seen
    use = large_batch.utilisation(client, rows)
    assert use["wall_s"] > 0 and set(use["per_worker"]) == {128, 256}


def test_amsgrad_synthetic_problem_adam_goes_to_plus_one_amsgrad_to_minus_one():
    adam = run(amsgrad=False, steps=20_000, record_every=20_000)
    ams = run(amsgrad=True, steps=20_000, record_every=20_000)
    assert adam[-1] > 0.99  # the worst point of [-1, 1]
    assert ams[-1] < -0.9  # towards the optimum x = -1
