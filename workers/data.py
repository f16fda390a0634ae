"""From a spec to batches: the job's factories imported and called (one path for Nestor's
built-ins and a user's own code), and each rank's share of every global batch read through
a ``DataLoader``.

The global batch of step ``s`` is a function of ``s`` and the seed alone (``batch_indices``),
so a run, a resumed run and a run on a different number of workers see the same samples.
The ``DataLoader`` only decides *how* they are read: in worker processes, ahead of the
step that needs them, into pinned memory on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data._utils.collate import default_collate

from .contract import Data, as_data
from .spec import DatasetSpec, FactorySpec, FileDatasetSpec, TrainSpec

TRACEBACK_CHARS = 6000  # of a user's traceback kept in the job's error


class SetupError(RuntimeError):
    """The job's code or data cannot train: a factory that is missing or raises, a data set
    smaller than one global batch, a model whose output the loss does not take. A restart
    would fail the same way, so the job fails at once, with this message as its error."""


# ------------------------------------------------------------------------------ factories
def import_callable(path: str, field: str) -> Callable[..., Any]:
    """The callable at ``module:attr`` (``field`` names the spec field, for the error)."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise SetupError(
                f"{field}: no module {e.name!r} (is it in the job's code package, at the "
                f"package's top level?)"
            ) from None
        raise SetupError(f"{field}: importing {module_name!r} failed:\n{_user_tb()}") from None
    except Exception:
        raise SetupError(f"{field}: importing {module_name!r} failed:\n{_user_tb()}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SetupError(f"{field}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SetupError(f"{field}: {path} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(spec: FactorySpec, field: str, *args: Any) -> Any:
    """``factory(*args, **kwargs)``; what it raises becomes a ``SetupError`` carrying the
    traceback."""
    fn = import_callable(spec.factory, field)
    try:
        return fn(*args, **spec.kwargs)
    except Exception as e:
        raise SetupError(
            f"{field} {spec.factory} raised {type(e).__name__}: {e}\n{_user_tb()}"
        ) from None


def _user_tb() -> str:
    text = traceback.format_exc()
    return text if len(text) <= TRACEBACK_CHARS else "...\n" + text[-TRACEBACK_CHARS:]


def data_factory(spec: TrainSpec) -> FactorySpec:
    """The data set as a factory call: a built-in name and a file data set stand for
    factories of Nestor's own package."""
    d = spec.dataset
    if isinstance(d, DatasetSpec):
        return d.factory_spec(spec.seed)
    if isinstance(d, FileDatasetSpec):
        return FactorySpec(factory="workers.files:load", kwargs=d.model_dump())
    return d


def load_data(spec: TrainSpec) -> Data:
    """Call the data factory and check what it gave against the spec."""
    factory = data_factory(spec)
    data = call_factory(factory, "dataset.factory")
    try:
        data = as_data(data, f"dataset.factory {factory.factory}")
        n_train, n_val = len(data.train), len(data.val)
    except TypeError as e:
        raise SetupError(str(e)) from None
    if n_train < spec.batch_size:
        raise SetupError(
            f"the training set has {n_train} samples, fewer than one global batch "
            f"(batch_size={spec.batch_size})"
        )
    if n_val < 1:
        raise SetupError("the validation set is empty")
    return data


def build_model(spec: TrainSpec, data: Data) -> torch.nn.Module:
    """The model factory's module, initialised from the spec's seed."""
    torch.manual_seed(spec.seed)
    factory = spec.model_factory()
    model = call_factory(factory, "model.factory", data)
    if not isinstance(model, torch.nn.Module):
        raise SetupError(
            f"model.factory {factory.factory} returned {type(model).__name__}, not a "
            f"torch.nn.Module"
        )
    return model


class Objective:
    """The loss (the spec's, or the task's default) and the accuracy where it means one."""

    def __init__(self, spec: TrainSpec, data: Data) -> None:
        self.task = data.task
        if spec.loss:
            self.name, self.fn = spec.loss, import_callable(spec.loss, "loss")
        elif data.task == "regression":
            self.name, self.fn = "mean squared error", F.mse_loss
        else:
            self.name, self.fn = "cross-entropy", _cross_entropy

    def __call__(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        try:
            loss = self.fn(outputs, targets)
        except Exception as e:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs)
            raise SetupError(
                f"the model's output {shape} does not fit the loss ({self.name}) with targets "
                f"{tuple(targets.shape)} {targets.dtype}: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise SetupError(f"the loss ({self.name}) must return a scalar tensor, not {loss!r}")
        return loss.reshape(())

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """How many predictions are right, where the task has classes; else None."""
        if self.task == "regression" or outputs.shape[:-1] != targets.shape:
            return None
        return (outputs.argmax(-1) == targets).sum()


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.dim() > 2:  # (B, T, vocab) against (B, T)
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())
    return F.cross_entropy(outputs, targets)


# ---------------------------------------------------------------------------- batch order
@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample indices of global batch ``step``: a fresh permutation of the training set per
    epoch (seeded by seed and epoch), read in order; a batch may span epochs."""
    out, pos, end = [], step * batch_size, (step + 1) * batch_size
    while pos < end:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, end - pos)
        out.append(_epoch_order(n, seed, epoch)[offset : offset + take])
        pos += take
    return torch.cat(out)


def fetch(dataset: Any, indices: torch.Tensor | np.ndarray) -> tuple[Any, Any]:
    """Samples ``indices`` of a map-style data set as a batch: one ``batch`` call where the
    data set has one, else one ``dataset[i]`` per sample, collated."""
    if hasattr(dataset, "batch"):
        return dataset.batch(np.asarray(indices))
    return default_collate([dataset[i] for i in np.asarray(indices).tolist()])


class _MicroBatches(TorchDataset):
    """Item ``(step, j)``: micro-batch ``j`` of this rank's share of global batch ``step``."""

    def __init__(self, train: Any, spec: TrainSpec, rank: int, world: int) -> None:
        self.train, self.spec, self.rank = train, spec, rank
        # This rank's share of each global batch, [r B / w, (r + 1) B / w), and where each of
        # its micro-batches starts in it (all micro_batch_size for a fixed job).
        self.lo = rank * spec.batch_size // world
        self.hi = (rank + 1) * spec.batch_size // world
        sizes = spec.micro_sizes(rank, world)
        self.bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        self.n = len(train)
        self._step: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        step, j = key
        if self._step is None or self._step[0] != step:
            idx = batch_indices(step, self.spec.batch_size, self.n, self.spec.seed)
            self._step = (step, idx[self.lo : self.hi])
        return fetch(self.train, self._step[1][self.bounds[j] : self.bounds[j + 1]])

    def __len__(self) -> int:
        return self.spec.max_steps * (len(self.bounds) - 1)


class _Keys(Sampler):
    def __init__(self, start: int, spec: TrainSpec, world: int) -> None:
        self.start, self.stop, self.accum = start, spec.max_steps, spec.accumulation_at(world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((s, j) for s in range(self.start, self.stop) for j in range(self.accum))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def loader_workers(spec: TrainSpec) -> int:
    """DataLoader processes per rank: the spec's, else none for the built-in in-memory
    data sets (already tensors: a process would only add copies) and one otherwise."""
    if spec.loader_workers is not None:
        return spec.loader_workers
    return 0 if isinstance(spec.dataset, DatasetSpec) else 1


def micro_batches(
    data: Data, spec: TrainSpec, rank: int, world: int, start: int, device: torch.device
) -> Iterator[tuple[Any, Any]]:
    """This rank's micro-batches from step ``start`` to the end, in training order."""
    workers = loader_workers(spec)
    return iter(
        DataLoader(
            _MicroBatches(data.train, spec, rank, world),
            sampler=_Keys(start, spec, world),
            batch_size=None,  # each item is already a micro-batch
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
    )
