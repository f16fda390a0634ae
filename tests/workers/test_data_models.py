"""Offline datasets, split deterministically by seed, and every built-in model, all reached
through the same factory path as a user's own."""

from __future__ import annotations

import pytest
import torch

from optimizers import Adan
from workers import TrainSpec
from workers.data import Objective, build_model, load_data
from workers.spec import BUILTIN_MODELS


@pytest.fixture(autouse=True)
def nestor_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTOR_HOME", str(tmp_path))
    return tmp_path


def _data(dataset: dict, seed: int = 0):
    model = next(m for m, (_, takes, _) in BUILTIN_MODELS.items() if dataset["name"] in takes)
    spec = TrainSpec(model=model, dataset=dataset, batch_size=64, micro_batch_size=64, seed=seed)
    return load_data(spec)


def _tensors(ds):
    return ds.batch(torch.arange(len(ds)))


def test_mnist1d_is_generated_cached_and_split_by_seed(nestor_home):
    spec = {"name": "mnist1d", "num_samples": 1000}
    a = _data(spec)
    assert (nestor_home / "datasets" / "mnist1d-1000.npz").exists()
    b, c = _data(spec), _data(spec, seed=1)  # from the cache; another split
    (xa, ya), (xb, _), (_, yc) = _tensors(a.train), _tensors(b.train), _tensors(c.val)
    assert xa.shape == (900, 40) and len(a.val) == 100
    assert torch.equal(xa, xb) and not torch.equal(_tensors(a.val)[1], yc)
    assert set(ya.tolist()) == set(range(10))


def test_digits_and_stdlib_corpus():
    digits = _data({"name": "digits"})
    assert digits.input_shape == (64,) and digits.num_classes == 10
    text = _data({"name": "pystdlib-chars", "num_samples": 500, "seq_len": 32})
    assert text.task == "lm" and text.input_shape == (32,)
    x, y = _tensors(text.train)
    assert torch.equal(x[0, 1:], y[0, :-1])  # targets are the inputs shifted by one byte


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_every_model_takes_an_optimizer_step_on_its_dataset(name):
    spec = TrainSpec(
        model=name,
        dataset={"name": BUILTIN_MODELS[name][1][0], "num_samples": 300, "seq_len": 16},
        batch_size=8,
        micro_batch_size=8,
    )
    data = load_data(spec)
    model = build_model(spec, data)
    x, y = data.train.batch(torch.arange(8))
    out = model(x)
    expected = (8, 16, 256) if data.task == "lm" else (8, data.num_classes)
    assert tuple(out.shape) == expected
    objective = Objective(spec, data)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Adan(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):  # the same batch three times: the loss must fall
        opt.zero_grad()
        loss = objective(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
