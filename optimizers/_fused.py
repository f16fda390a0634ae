"""Compiled elementwise optimizer kernels: one torch.compile graph serves every tensor size.

An elementwise update (Adan, AdamW) is memory-bound: the fastest step reads and writes each
buffer once. ``FusedKernel`` compiles the per-tensor update with torch.compile (C++/OpenMP on
CPU, Triton on GPU) over a fixed-size chunk of flattened tensors with dynamic sizes, so one
compile serves any model, and a 200-tensor model costs 50 calls rather than 200.
Compiling over the whole list instead would take minutes (compile time grows with the list).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

# Tensors per compiled call. Larger chunks mean fewer calls but a longer first compile.
CHUNK = 4
# Below this many elements a tensor is stepped by the foreach path: a compiled call costs
# ~20 us of Python overhead, more than the tensor's own update.
MIN_NUMEL = 4096


class FusedKernel:
    """Applies ``kernel(*tensors, hp)`` to lists of tensors, compiled, CHUNK tensors per call.

    ``kernel`` takes one 1-D tensor from each list plus ``hp``, a 1-D tensor of
    hyperparameters, and updates its arguments in place. Every list must hold contiguous
    tensors of matching sizes; dtypes may differ between lists (bf16 params, fp32 state).
    """

    def __init__(self, kernel: Callable[..., None]) -> None:
        self.kernel = kernel
        # Made on first use: torch.compile imports dynamo (seconds), which importing an
        # optimizer, or stepping one that never fuses, should not pay.
        self._compiled: Callable[..., None] | None = None
        self._scratch: dict[tuple, list[list[Tensor]]] = {}

    def _chunk(self, tensors: list[list[Tensor]], hp: Tensor) -> None:
        for i in range(len(tensors[0])):
            self.kernel(*(column[i] for column in tensors), hp)

    def _pad(self, like: list[Tensor], missing: int) -> list[list[Tensor]]:
        """Distinct throwaway two-element tensors that fill a short last chunk. Sizes 0 and 1
        would be specialised by dynamo, and repeating one tensor changes the aliasing guards:
        either would force a recompile."""
        key = tuple((t.dtype, t.device) for t in like)
        if key not in self._scratch:
            self._scratch[key] = [
                [torch.zeros(2, dtype=t.dtype, device=t.device) for _ in range(CHUNK - 1)]
                for t in like
            ]
        return [column[:missing] for column in self._scratch[key]]

    def __call__(
        self, lists: list[list[Tensor]], hp: Tensor, views: FlatViews | None = None
    ) -> None:
        """Run the kernel over ``lists``; ``views`` caches the 1-D views of the lists after
        the second (the gradients change every step, parameters and state do not)."""
        if self._compiled is None:
            self._compiled = torch.compile(self._chunk, dynamic=True, fullgraph=True)
        views = views if views is not None else FlatViews()
        columns = [
            [t.view(-1) for t in column] if j == 1 else views.flat(column)
            for j, column in enumerate(lists)
        ]
        n = len(columns[0])
        # Without duck sizing, equal sizes seen at compile time are not assumed equal later.
        with fx_config.patch(use_duck_shape=False):
            for start in range(0, n, CHUNK):
                chunk = [column[start : start + CHUNK] for column in columns]
                missing = CHUNK - len(chunk[0])
                if missing:
                    pad = self._pad([column[0] for column in chunk], missing)
                    chunk = [c + p for c, p in zip(chunk, pad, strict=True)]
                self._compiled(chunk, hp)


class FlatViews:
    """1-D views of long-lived tensors (parameters, optimizer state), kept across steps:
    making 1,000 views costs a millisecond a step, which a memory-bound step notices.

    A view is reused only while its tensor still starts at the same address; the view holds
    that storage, so no other tensor can have come to live there meanwhile.
    """

    def __init__(self) -> None:
        self._views: dict[int, Tensor] = {}

    def flat(self, tensors: list[Tensor]) -> list[Tensor]:
        out = []
        for t in tensors:
            view = self._views.get(id(t))
            if view is None or view.data_ptr() != t.data_ptr() or view.numel() != t.numel():
                view = self._views[id(t)] = t.view(-1)
            out.append(view)
        return out


def split_for_fused(*lists: list[Tensor]) -> tuple[list[int], list[int]]:
    """Indices of the tensors worth compiling (large and contiguous) and of the rest."""
    big, small = [], []
    for i in range(len(lists[0])):
        ok = lists[0][i].numel() >= MIN_NUMEL and all(t[i].is_contiguous() for t in lists)
        (big if ok else small).append(i)
    return big, small


def hyperparams(values: list[float | Tensor], like: Tensor) -> Tensor:
    """Pack scalars (Python numbers or 0-d tensors, e.g. a clip coefficient) into one tensor
    on ``like``'s device, in its dtype, without a host-device sync."""
    hp = torch.tensor(
        [v if isinstance(v, float | int) else 0.0 for v in values], dtype=like.dtype
    ).to(like.device, non_blocking=True)
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            hp[i] = v
    return hp
