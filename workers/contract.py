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

import contextlib
import mmap
import os
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

    ``batch(indices)`` reads the rows in one indexing operation. A memory-mapped array's
    rows are read with ``pread`` from its file, in ascending order, not through the mapping:
    a random row read through a mapping costs a page fault, the kernel maps up to 64 KiB
    around each one, and those pages count in the worker's resident memory until they are
    unmapped. Measured on 8,192 random rows of 160 bytes out of 2 GB (in the page cache):
    the mapping, unmapped after each batch to bound memory, 44-47 ms; ``pread``, 10 ms and
    no growth at all; the same rows from a tensor in memory, 1.4-2 ms. An array of at most
    ``MAPPED_BYTES`` (the targets, typically) is read through its mapping, where all of it
    may stay resident: one syscall per row would cost more than it saves.
    """

    MAPPED_BYTES = 256 << 20

    def __init__(self, inputs: Any, targets: Any, start: int = 0, stop: int | None = None):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets
        self.start = start
        self.stop = len(inputs) if stop is None else stop
        self._files: dict[str, int] = {}

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
        rows = np.asarray(indices, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)})")
        rows = rows + self.start
        return self._take(self.inputs, rows), self._take(self.targets, rows)

    def _take(self, array: Any, rows: np.ndarray) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array[torch.from_numpy(rows)]
        if (
            isinstance(array, np.memmap)
            and array.filename
            and array.flags.c_contiguous
            and array.nbytes > self.MAPPED_BYTES
        ):
            return torch.from_numpy(self._pread(array, rows))
        if isinstance(array, np.memmap):
            order = np.argsort(rows, kind="stable")  # forwards through the file
            out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
            out[order] = array[rows[order]]
            return torch.from_numpy(out)
        return torch.from_numpy(np.ascontiguousarray(array[rows]))

    def _pread(self, array: np.memmap, rows: np.ndarray) -> np.ndarray:
        fd = self._files.get(array.filename)
        if fd is None:
            fd = self._files[array.filename] = os.open(array.filename, os.O_RDONLY)
        width = array.itemsize * (array.size // max(1, len(array)))
        order = np.argsort(rows, kind="stable")  # forwards through the file
        pread = os.pread  # one call per row: this loop is the whole cost (10 ms per 8,192)
        data = b"".join(
            [pread(fd, width, o) for o in (rows[order] * width + array.offset).tolist()]
        )
        if len(data) != width * len(rows):
            raise OSError(f"{array.filename}: short read (is the file still being written?)")
        out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        out[order] = np.frombuffer(data, dtype=array.dtype).reshape(out.shape)
        return out

    def release(self) -> None:
        """Hand the pages a read through the mapping left resident back to the page cache."""
        for a in (self.inputs, self.targets):
            if isinstance(a, np.memmap) and a._mmap is not None:
                a._mmap.madvise(mmap.MADV_DONTNEED)

    def __getstate__(self) -> dict[str, Any]:
        # A memory-mapped array would pickle as a copy of the whole file (a DataLoader
        # started with "spawn" pickles its data set): send where it is instead.
        state = {**self.__dict__, "_files": {}}
        for name in ("inputs", "targets"):
            a = state[name]
            if isinstance(a, np.memmap) and a.filename:
                order = "C" if a.flags.c_contiguous else "F"
                state[name] = ("memmap", a.filename, a.dtype.str, a.shape, a.offset, order)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("inputs", "targets"):
            a = state[name]
            if isinstance(a, tuple) and a and a[0] == "memmap":
                _, filename, dtype, shape, offset, order = a
                state[name] = np.memmap(
                    filename, np.dtype(dtype), "r", offset=offset, shape=shape, order=order
                )
        self.__dict__.update(state)

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


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
