"""The large-batch study in miniature through the live service on the real Ray cluster (the
same sweep file as docs/large-batch, shrunk), and the AMSGrad paper's synthetic problem."""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from service.cli import main as nestor
from service.client import NestorError
from studies import large_batch
from studies.amsgrad_synthetic import run
from workers.spec import optimizer_label

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


def test_miniature_steps_to_target_study_and_its_recipe(service, capsys):
    """The steps-to-target study's own sweep file, shrunk: 2 optimizers x 2 lrs x 2 batch
    sizes through the live service. Each trial's reached step is the first evaluation of
    its metrics at the target; each cell's best lr is the lr with the fewest steps; the
    recipe's power law is the hand-computed line through the two best lrs."""
    live, client = service
    sweep = json.loads((STUDY / "steps-lr-search.json").read_text())
    mini = copy.deepcopy(sweep)
    mini["name"] = "mini steps to target"
    mini["base"]["dataset"] = {"name": "mnist1d", "num_samples": 2000}
    mini["base"]["stop_at"] = {**sweep["base"]["stop_at"], "value": 0.3}
    by_label = defaultdict(list)
    for opt in sweep["space"]["optimizer"]:
        by_label[optimizer_label({"optimizer": opt})].append(opt)
    labels = list(by_label)[:2]
    mini["space"] = {"optimizer": [o for label in labels for o in by_label[label][1:3]]}
    mini["points"] = [
        {"batch_size": 128, "micro_batch_size": 128, "max_steps": 60},
        {"batch_size": 256, "micro_batch_size": 256, "max_steps": 40},
    ]
    mini["max_concurrent"] = 4
    created = client.sweep(mini)
    assert created["trials"] == 8
    done = wait_for_sweep(client, created["id"], timeout=600)
    assert done["status"] == "succeeded", done

    jobs = {j["id"]: j for j in client.jobs(sweep=created["id"], limit=100)["data"]}
    steps: dict[tuple[str, int, float], int | None] = {}
    for job in jobs.values():
        series = client.metrics(job["id"], keys=["val_accuracy"])["series"]["val_accuracy"]
        first = next(
            (s for s, v in zip(series["step"], series["value"], strict=True) if v >= 0.3), None
        )
        assert job["reached_target_at_step"] == first, job
        if first is not None:
            assert job["last_step"] == first  # it stopped there
        spec = job["spec"]
        steps[(optimizer_label(spec), spec["batch_size"], spec["optimizer"]["lr"])] = first
    assert sum(v is not None for v in steps.values()) >= 6  # the target is within reach

    cells = {(c["optimizer"], c["batch_size"]): c for c in done["cells"]}
    assert set(cells) == {(label, b) for label in labels for b in (128, 256)}
    best: dict[tuple[str, int], float] = {}
    for (label, batch), cell in cells.items():
        tried = {lr: s for (o, b, lr), s in steps.items() if (o, b) == (label, batch)}
        assert [row["lr"] for row in cell["lrs"]] == sorted(tried)
        reached = {lr: s for lr, s in tried.items() if s is not None}
        if not reached:
            assert cell["best_lr"] is None and cell["steps_to_target"] is None
            continue
        lr = min(reached, key=lambda x: (reached[x], x))
        assert (cell["best_lr"], cell["steps_to_target"]) == (lr, reached[lr])
        assert cell["best_on_edge"] is True  # two lrs: either is an edge
        best[(label, batch)] = lr

    answer = client.recipe(created["id"], batch_size=1024)
    assert answer["target"]["value"] == 0.3
    for recipe in answer["recipes"]:
        label = recipe["optimizer"]
        if (label, 128) not in best or (label, 256) not in best:
            assert recipe["exponent"] is None
            continue
        exponent = math.log(best[(label, 256)] / best[(label, 128)]) / math.log(2)
        assert recipe["exponent"] == pytest.approx(exponent, abs=1e-9)
        assert recipe["lr_ref"] == pytest.approx(best[(label, 128)])
        assert recipe["residual"] == pytest.approx(0.0, abs=1e-9)  # two points: exact
        assert recipe["suggested_lr"] == pytest.approx(best[(label, 128)] * 8**exponent)

    args = ["recipe", str(created["id"]), "--url", live.url, "--token", live.settings.admin_token]
    assert nestor([*args, "--batch-size", "1024"]) == 0
    out = capsys.readouterr().out
    assert "suggested lr at batch 1,024" in out and labels[0] in out
    # A sweep without a target has no recipe: 409, whatever state its trials are in.
    bare = client.sweep({**mini, "base": {**mini["base"], "stop_at": None}, "points": []})
    with pytest.raises(NestorError) as refused:
        client.recipe(bare["id"])
    assert refused.value.status == 409 and "no stop_at target" in str(refused.value.detail)
    assert client.sweep_detail(bare["id"])["cells"] is None
    client.cancel_sweep(bare["id"])


def test_amsgrad_synthetic_problem_adam_goes_to_plus_one_amsgrad_to_minus_one():
    adam = run(amsgrad=False, steps=20_000, record_every=20_000)
    ams = run(amsgrad=True, steps=20_000, record_every=20_000)
    assert adam[-1] > 0.99  # the worst point of [-1, 1]
    assert ams[-1] < -0.9  # towards the optimum x = -1
