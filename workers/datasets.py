"""Nestor's built-in data sets: ordinary data factories (``workers.contract``), named in a
spec by alias (``{"name": "mnist1d"}`` is ``{"factory": "workers.datasets:mnist1d"}``).

They work offline on any machine, each split deterministically by seed:

- ``mnist1d``: generated locally by the ``mnist1d`` package (its ``make_dataset``; never its
  downloading ``get_dataset``), cached in ``NESTOR_HOME/datasets`` as .npz.
- ``digits``: scikit-learn's 8x8 digits, shipped inside the package.
- ``pystdlib-chars``: next-byte prediction over the Python standard library's own source
  files, read in sorted order: a text corpus every Python install has.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from .contract import ArrayDataset, Data, Task
from .spec import DEFAULT_HOME, DEFAULT_SAMPLES, HOME_VARIABLE


def nestor_home() -> Path:
    """NESTOR_HOME (default ~/.nestor) as a job's processes see it: the service sets it in
    each job's environment from its settings, ``nestor train`` inherits the user's."""
    return Path(os.environ.get(HOME_VARIABLE, DEFAULT_HOME)).expanduser()


def share(path: Path) -> None:
    """A cache entry every job may read: jobs run as uids of their own, with umask 077."""
    os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if path.is_dir():
        for child in path.iterdir():
            share(child)


def _split(x, y, val_fraction: float, seed: int, task: Task, classes: int) -> Data:
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]

    def tensors(rows):
        return ArrayDataset(
            torch.from_numpy(np.ascontiguousarray(x[rows])),
            torch.from_numpy(np.ascontiguousarray(y[rows])),
        )

    return Data(tensors(train), tensors(val), task, classes)


def mnist1d(
    num_samples: int | None = None, val_fraction: float = 0.1, seed: int = 0, **_: object
) -> Data:
    """MNIST-1D: 40-sample signals of 10 classes, generated here (never downloaded)."""
    n = num_samples or DEFAULT_SAMPLES["mnist1d"]
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
        share(tmp)
        try:
            os.replace(tmp, cache)
        except PermissionError:  # another job's copy, in a cache it may not replace
            tmp.unlink()
    return _split(x, y, val_fraction, seed, "classification", 10)


def digits(
    num_samples: int | None = None, val_fraction: float = 0.1, seed: int = 0, **_: object
) -> Data:
    """scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    if num_samples:
        x, y = x[:num_samples], y[:num_samples]
    return _split(x, y, val_fraction, seed, "classification", 10)


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


def pystdlib_chars(
    num_samples: int | None = None,
    val_fraction: float = 0.1,
    seq_len: int = 64,
    seed: int = 0,
    **_: object,
) -> Data:
    """Next-byte prediction over the standard library's sources: (N, seq_len) byte ids."""
    n = num_samples or DEFAULT_SAMPLES["pystdlib-chars"]
    corpus = np.frombuffer(stdlib_corpus(n * seq_len + 1), dtype=np.uint8).astype(np.int64)
    n = (len(corpus) - 1) // seq_len
    x = corpus[: n * seq_len].reshape(n, seq_len)
    y = corpus[1 : n * seq_len + 1].reshape(n, seq_len)
    return _split(x, y, val_fraction, seed, "lm", 256)
