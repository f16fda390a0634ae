"""TrainSpec validation, LR scaling and schedules, the data order."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch

from workers import LRScheduleSpec, TrainSpec
from workers.loop import batch_indices
from workers.schedule import lr_factor

EXAMPLE = {
    "model": "mnist1d-cnn",
    "dataset": {"name": "mnist1d", "num_samples": 400000},
    "optimizer": {"name": "adan", "lr": 0.01, "weight_decay": 0.02},
    "batch_size": 32768,
    "micro_batch_size": 2048,
    "num_workers": 2,
    "zero_stage": 2,
    "max_steps": 100,
    "lr_schedule": {"kind": "cosine", "warmup_steps": 10},
    "lr_scaling": {"rule": "sqrt", "base_batch_size": 1024},
    "max_grad_norm": 1.0,
    "seed": 0,
    "eval_every": 10,
    "checkpoint_every": 20,
    "use_gpu": False,
}


def test_the_issue_example_is_valid():
    spec = TrainSpec.model_validate(EXAMPLE)
    assert spec.accumulation_steps == 8
    opt = spec.optimizer_spec()
    assert math.isclose(opt.lr, 0.01 * math.sqrt(32))
    assert opt.max_grad_norm == 1.0


def errors(spec: dict) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        TrainSpec.model_validate(spec)
    return str(info.value)


def test_batch_arithmetic_error_names_fields_and_suggests_values():
    msg = errors({**EXAMPLE, "batch_size": 30000})
    assert "batch_size (30000) must equal micro_batch_size (2048) x num_workers (2)" in msg
    assert "nearest valid batch_size: 28672 or 32768" in msg


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": "resnet50"}, "unknown model 'resnet50'"),
        ({"dataset": {"name": "imagenet"}}, "unknown dataset 'imagenet'"),
        ({"dataset": {"name": "digits"}}, "model 'mnist1d-cnn' does not take dataset 'digits'"),
        ({"optimizer": {"name": "sgd"}}, "Unknown optimizer name: 'sgd'"),
        ({"zero_stage": 3}, "zero_stage"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"lr_schedule": {"kind": "step"}}, "lr_schedule.kind"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_invalid_specs_name_the_field(change, expected):
    assert expected in errors({**EXAMPLE, **change})


def test_every_field_has_a_description_or_model():
    for name, field in TrainSpec.model_fields.items():
        assert field.description or field.annotation not in (int, float, bool, str), name


def test_schedule_warmup_then_cosine_to_floor():
    spec = LRScheduleSpec(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, 100, spec) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, LRScheduleSpec(kind="constant")) == 1.0
    assert lr_factor(55, 100, LRScheduleSpec(kind="linear", warmup_steps=10)) == pytest.approx(0.5)


def test_batch_order_is_a_permutation_per_epoch_and_reproducible():
    n, b = 10, 4
    steps = torch.cat([batch_indices(s, b, n, seed=3) for s in range(5)])  # 2 epochs
    assert sorted(steps[:10].tolist()) == list(range(10))
    assert sorted(steps[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, b, n, seed=3), batch_indices(2, b, n, seed=3))
    assert not torch.equal(batch_indices(0, 10, n, seed=3), batch_indices(0, 10, n, seed=4))


def test_an_epoch_budget_sets_max_steps_for_every_batch_size():
    base = {
        "model": "mnist1d-cnn",
        "dataset": {"name": "mnist1d", "num_samples": 36_000},  # 32,400 for training
        "micro_batch_size": 512,
        "num_workers": 2,
        "epochs": 30,
    }
    steps = {b: TrainSpec(**base, batch_size=b).max_steps for b in (1024, 4096, 32768)}
    assert steps == {1024: 950, 4096: 238, 32768: 30}  # ceil(30 x 32400 / b)
    again = TrainSpec(**TrainSpec(**base, batch_size=4096).model_dump())
    assert again.max_steps == 238  # a stored spec validates to the same budget


@pytest.mark.parametrize("dataset", [{"name": "digits"}, {"name": "mnist1d", "num_samples": 1000}])
def test_train_samples_is_what_the_loaded_dataset_holds(dataset, nestor_home):
    from workers.data import load_data

    model = "digits-mlp" if dataset["name"] == "digits" else "mnist1d-mlp"
    spec = TrainSpec(model=model, dataset=dataset, batch_size=256)
    assert len(load_data(spec).train) == spec.dataset.train_samples()


def test_warmup_fraction_scales_with_the_run_length():
    spec = LRScheduleSpec(kind="constant", warmup_fraction=0.1)
    assert [lr_factor(s, 30, spec) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert lr_factor(94, 950, spec) == 1.0 and lr_factor(93, 950, spec) == 94 / 95


def test_a_fractional_epoch_budget_does_not_gain_a_step_from_float_noise():
    spec = TrainSpec(
        dataset={"name": "mnist1d", "num_samples": 1000},  # 900 for training
        batch_size=99,
        micro_batch_size=99,
        epochs=1.1,
    )
    assert spec.max_steps == 10  # 1.1 x 900 / 99 = 10 exactly


def test_stop_at_names_the_metric_and_takes_its_direction():
    with pytest.raises(
        pydantic.ValidationError, match=r"stop_at.metric .accuracy. is not an evaluation"
    ):
        TrainSpec.model_validate({"stop_at": {"metric": "accuracy", "value": 0.9}})
    with pytest.raises(pydantic.ValidationError, match="value"):
        TrainSpec.model_validate({"stop_at": {"metric": "val_loss"}})
    assert (
        TrainSpec.model_validate({"stop_at": {"metric": "val_loss", "value": 0.1}}).stop_at.mode
        == "min"
    )
    spec = TrainSpec.model_validate({"stop_at": {"value": 0.9}})
    assert (spec.stop_at.metric, spec.stop_at.mode) == ("val_accuracy", "max")
    assert spec.stop_at.reached({"val_accuracy": 0.9}) and not spec.stop_at.reached(
        {"val_loss": 0.1}
    )
    assert not spec.stop_at.reached({"val_accuracy": float("nan")})


@pytest.mark.parametrize("resolution", [0.01, 0.05, 0.2])
def test_stop_at_cadence_resolves_the_step_to_its_resolution(resolution):
    """Between an evaluation at step s and the one before it there are at most
    resolution x s steps: the step reported overshoots the true first step by less."""
    spec = TrainSpec.model_validate(
        {
            "max_steps": 100_000,
            "eval_every": 10**7,
            "stop_at": {"value": 0.9, "resolution": resolution},
        }
    )
    steps = [s for s in range(1, 100_001) if spec.evaluates_at(s)]
    gaps = [(b - a) / b for a, b in itertools.pairwise(steps) if b - a > 1]
    assert max(gaps) <= resolution
    # Geometric: about log(steps) / resolution evaluations, not a fixed share of the steps.
    assert len(steps) < 1.1 * (1 / resolution) * (1 + math.log(100_000 * resolution))
