"""The contract between Nestor and your code: three callables named in a job's spec.

    "code":    "sha256:..."                                  # your project, POST /v1/packages
    "dataset": {"factory": "mydata:load", "kwargs": {...}}   # load(**kwargs) -> Data
    "model":   {"factory": "mynet:build", "kwargs": {...}}   # build(data, **kwargs) -> nn.Module
    "loss":    "mynet:loss"                                   # loss(outputs, targets) -> tensor

- **The data factory** is called once per worker with the spec's ``kwargs`` (nothing is
  added) and returns a :class:`Data`, or simply ``(train, val)``: two map-style data sets,
  anything with ``len(ds)`` and ``ds[i] -> (input, target)`` (a ``torch.utils.data.Dataset``,
  a list of pairs, an :class:`ArrayDataset`). Nestor decides which samples make each global
  batch (a function of the step and the seed, so every run and every resume sees the same
  batches) and reads each rank's share through a ``DataLoader``. A data set that also has
  ``batch(indices) -> (inputs, targets)`` is read a batch at a time (:class:`ArrayDataset`
  does: one indexing operation instead of one call per sample).
- **The model factory** is called as ``build(data, **kwargs)`` after ``torch.manual_seed(seed)``
  and returns an ``nn.Module`` whose ``forward(inputs)`` gives the outputs the loss takes.
  ``data`` is what the data factory returned, for input sizes and class counts.
- **The loss** (optional) is ``loss(outputs, targets)``, a scalar mean over the batch. The
  default is cross-entropy (outputs ``(B, classes)`` or ``(B, T, vocab)`` against integer
  targets), or mean squared error when ``Data.task`` is ``"regression"``.
- **Metrics**: ``train_loss`` and ``val_loss`` always; ``val_accuracy`` when the task is
  ``"classification"`` or ``"lm"`` (the arg-max of the last dimension against the targets);
  ``val_bits_per_char`` for ``"lm"``.

An error in any of them ends the job as ``failed`` with your traceback as its error; such a
job is not retried, because a restart would fail the same way. Nothing here imports
Nestor's service; your code needs only torch (and this module, if you use its classes).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Task = Literal["classification", "lm", "regression"]


@dataclass
class Data:
    """What a data factory returns: a training and a validation set of (input, target)."""

    train: Any
    val: Any
    task: Task = "classification"
    num_classes: int | None = None  # classes, or the vocabulary size for "lm"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one training input (without the batch dimension)."""
        return tuple(torch.as_tensor(self.train[0][0]).shape)


class ArrayDataset:
    """Inputs and targets as two arrays of equal length: torch tensors, numpy arrays, or
    memory-mapped numpy arrays (``np.load(path, mmap_mode="r")``) bigger than memory.

    ``batch(indices)`` reads the rows in one indexing operation. A memory-mapped array is
    read in ascending row order, and its pages are handed back to the page cache as they
    accumulate (``MADV_DONTNEED``), so a worker's memory stays the size of a few batches
    however large the file.
    """

    RELEASE_BYTES = 64 << 20  # pages read before they are handed back

    def __init__(self, inputs: Any, targets: Any, start: int = 0, stop: int | None = None):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets
        self.start = start
        self.stop = len(inputs) if stop is None else stop
        self._read = 0

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        x, y = self.batch(np.array([i % len(self)]))
        return x[0], y[0]

    def split(self, at: int) -> tuple[ArrayDataset, ArrayDataset]:
        """Rows [0, at) and [at, len) as two views of the same arrays."""
        mid = self.start + at
        return (
            ArrayDataset(self.inputs, self.targets, self.start, mid),
            ArrayDataset(self.inputs, self.targets, mid, self.stop),
        )

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` (positions in this view) as two tensors, in the order given."""
        rows = np.asarray(indices, dtype=np.int64) + self.start
        return self._take(self.inputs, rows), self._take(self.targets, rows)

    def _take(self, array: Any, rows: np.ndarray) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array[torch.from_numpy(rows)]
        if not isinstance(array, np.memmap):
            return torch.from_numpy(np.ascontiguousarray(array[rows]))
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        out[order] = array[rows[order]]  # ascending reads: the file is read forwards
        self._read += out.nbytes
        if self._read >= self.RELEASE_BYTES:
            self._read = 0
            for a in (self.inputs, self.targets):
                if isinstance(a, np.memmap) and a._mmap is not None:
                    a._mmap.madvise(mmap.MADV_DONTNEED)
        return torch.from_numpy(out)


def as_data(value: Any, where: str) -> Data:
    """A data factory's return value as :class:`Data` (``where`` names the factory)."""
    if isinstance(value, Data):
        return value
    if isinstance(value, dict) and {"train", "val"} <= value.keys():
        return Data(**value)
    if isinstance(value, tuple | list) and len(value) == 2:
        return Data(*value)
    raise TypeError(
        f"{where} returned {type(value).__name__}; expected workers.contract.Data or a "
        f"(train, val) pair of map-style data sets"
    )
