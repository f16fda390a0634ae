"""Offline datasets, split deterministically by seed, and every registered model."""

from __future__ import annotations

import pytest
import torch

from workers import DatasetSpec
from workers.datasets import load_dataset
from workers.models import MODELS, build_model


@pytest.fixture(autouse=True)
def nestor_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTOR_HOME", str(tmp_path))
    return tmp_path


def test_mnist1d_is_generated_cached_and_split_by_seed(nestor_home):
    spec = DatasetSpec(name="mnist1d", num_samples=1000)
    a = load_dataset(spec, seed=0)
    assert (nestor_home / "datasets" / "mnist1d-1000.npz").exists()
    b = load_dataset(spec, seed=0)  # from the cache
    c = load_dataset(spec, seed=1)
    assert a.x_train.shape == (900, 40) and a.x_val.shape == (100, 40)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.y_val, c.y_val)
    assert set(a.y_train.tolist()) == set(range(10))


def test_digits_and_stdlib_corpus():
    digits = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert digits.x_train.shape[1] == 64 and digits.num_classes == 10
    text = load_dataset(DatasetSpec(name="pystdlib-chars", num_samples=500, seq_len=32), seed=0)
    assert text.kind == "lm" and text.x_train.shape[1] == 32
    # Targets are the inputs shifted by one byte.
    assert torch.equal(text.x_train[0, 1:], text.y_train[0, :-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_one_step_on_its_dataset(name):
    entry = MODELS[name]
    data = load_dataset(DatasetSpec(name=entry.datasets[0], num_samples=300, seq_len=16), 0)
    model = build_model(name, data, seed=0)
    out = model(data.x_train[:8])
    expected = (8, 16, 256) if data.kind == "lm" else (8, data.num_classes)
    assert tuple(out.shape) == expected
    loss = torch.nn.functional.cross_entropy(out.flatten(0, -2), data.y_train[:8].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
