"""Datasets that work offline on any machine, each split deterministically by seed.

- ``mnist1d``: generated locally by the ``mnist1d`` package (its ``make_dataset``; never its
  downloading ``get_dataset``), cached in ``NESTOR_HOME/datasets`` as .npz.
- ``digits``: scikit-learn's 8x8 digits, shipped inside the package.
- ``pystdlib-chars``: next-byte prediction over the Python standard library's own source
  files, read in sorted order: a text corpus every Python install has.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .spec import DatasetSpec


def nestor_home() -> Path:
    """NESTOR_HOME (default ~/.nestor): datasets, checkpoints, the embedded database."""
    return Path(os.environ.get("NESTOR_HOME", Path.home() / ".nestor")).expanduser()


@dataclass
class Dataset:
    """Tensors for one job. ``kind`` is "classification" (x: features, y: class) or "lm"
    (x: (N, T) byte ids, y: the same shifted by one)."""

    name: str
    kind: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int  # classes, or the vocabulary size for "lm"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _mnist1d(spec: DatasetSpec, seed: int) -> Dataset:
    n = spec.total_samples()
    cache = nestor_home() / "datasets" / f"mnist1d-{n}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = n
        args.train_split = 1.0 - 1.0 / n  # keep (almost) everything together; we split below
        data = make_dataset(args)  # generated here: fixed generator seed 42, no download
        x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
        y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Workers may generate concurrently: each writes its own file, then an atomic rename.
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, cache)
    return _tensors("mnist1d", "classification", *_split(x, y, spec.val_fraction, seed), 10)


def _digits(spec: DatasetSpec, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    if spec.num_samples:
        x, y = x[: spec.num_samples], y[: spec.num_samples]
    return _tensors("digits", "classification", *_split(x, y, spec.val_fraction, seed), 10)


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's .py sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            chunk = path.read_bytes()
        except OSError:
            continue
        out.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def _pystdlib_chars(spec: DatasetSpec, seed: int) -> Dataset:
    n = spec.total_samples()
    t = spec.seq_len
    corpus = np.frombuffer(stdlib_corpus(n * t + 1), dtype=np.uint8).astype(np.int64)
    n = (len(corpus) - 1) // t
    x = corpus[: n * t].reshape(n, t)
    y = corpus[1 : n * t + 1].reshape(n, t)
    return _tensors("pystdlib-chars", "lm", *_split(x, y, spec.val_fraction, seed), 256)


def _tensors(name, kind, x_train, y_train, x_val, y_val, num_classes) -> Dataset:
    as_t = torch.from_numpy
    return Dataset(
        name,
        kind,
        as_t(np.ascontiguousarray(x_train)),
        as_t(np.ascontiguousarray(y_train)),
        as_t(np.ascontiguousarray(x_val)),
        as_t(np.ascontiguousarray(y_val)),
        num_classes,
    )


DATASETS: dict[str, Callable[[DatasetSpec, int], Dataset]] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "pystdlib-chars": _pystdlib_chars,
}


def load_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Build (or read from the cache) the dataset ``spec`` names, split by ``seed``."""
    return DATASETS[spec.name](spec, seed)
