"""Low-bit optimizer state inside one compiled kernel: decode, the fp32 update, encode.

The readable path (``NestorOptimizer._step_decoded``) decodes a tensor's state to fp32 with
``lowbit.decode``, runs the fp32 update and writes it back with ``lowbit.encode``. The
kernels here run the same three steps, calling the same functions, inside one
torch.compile graph (C++/OpenMP on CPU, Triton on GPU), so the fp32 state exists only in
registers: a step reads and writes the codes (1 byte an element, 2 for bf16), their block
scales and the parameters and gradients, and nothing else.

An int8 run is laid out as (blocks, BLOCK): its length is a multiple of ``lowbit.BLOCK``,
the block width is a static dimension (``mark_static``) and the block count a dynamic one,
so that one compile serves every size and the compiler sees whole blocks (no padding, no
index arithmetic). bf16 runs are 1-D. The step count enters as the last entry of the
hyperparameter tensor (the rounding bits hash it), so one compile serves every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from . import lowbit

CODE_DTYPES = (torch.int8, torch.uint8)
# Inductor writes an intermediate to memory when many reads depend on it
# (``realize_reads_threshold``, 4 by default). A decoded state buffer feeds its block's
# absmax, its codes and the parameter update, so by default three of Adan's four fp32
# states were written out as full-size temporaries (12 bytes per parameter at the step's
# peak, and their traffic). Recomputing them from the codes instead keeps them in
# registers: the kernels then allocate only the new block scales. The operation-count
# threshold stays at its default: lifting it too inlined so much that compiling an int8
# AdamW step ran past ten minutes.
KEEP_IN_REGISTERS = {
    "realize_reads_threshold": 1 << 30,
    "realize_acc_reads_threshold": 1 << 30,
}


def entry_keys(keys: tuple[str, ...], fmt: str) -> tuple[str, ...]:
    """The state entries that hold ``keys`` in format ``fmt``: the buffers, then for int8
    each buffer's scales (the order in which the kernels take them)."""
    if fmt == "int8":
        return (*keys, *(key + lowbit.SCALE_SUFFIX for key in keys))
    return keys


def run_encoded(
    kernel: Callable[..., None],
    keys: tuple[str, ...],
    param: Tensor,
    grad: Tensor,
    buffers: list[Tensor],
    hp: Tensor,
) -> None:
    """The body of every low-bit kernel (traced by torch.compile): state ``keys`` decoded
    from ``buffers`` (bf16 tensors; or int8/uint8 codes, then their scales), updated by the
    fp32 ``kernel(param, grad, *states, hp[:-1])``, and encoded back with step ``hp[-1]``."""
    fmt = "int8" if buffers[0].dtype in CODE_DTYPES else "bf16"
    entry = dict(zip(entry_keys(keys, fmt), buffers, strict=True))
    work = [lowbit.decode(entry, key) for key in keys]
    kernel(param, grad, *work, hp[:-1])
    for key, value in zip(keys, work, strict=True):
        lowbit.encode(entry, key, value, hp[-1])


def encodable(param: Tensor, states: list[Tensor]) -> bool:
    """Whether a tensor can be stepped by an encoded kernel in place: contiguous, with its
    gradient, at least ``MIN_NUMEL`` elements (a compiled call costs more than a small
    tensor's update) and, for int8 state, whole blocks."""
    from ._fused import MIN_NUMEL

    if param.numel() < MIN_NUMEL or not param.is_contiguous() or not param.grad.is_contiguous():
        return False
    if not all(t.is_contiguous() for t in states):
        return False
    return states[0].dtype not in CODE_DTYPES or param.numel() % lowbit.BLOCK == 0


class EncodedKernel:
    """Applies ``kernel(param, grad, *buffers, hp)`` (a function that calls ``run_encoded``)
    to lists of tensors, compiled, one call per tensor.

    ``lists`` holds the parameters, the gradients, then one list per state entry in
    ``entry_keys`` order. Int8 tensors are passed as (blocks, BLOCK) views, bf16 ones flat.
    Each kernel function needs a code object of its own (torch.compile caches, and limits
    recompiles, per code object): one per optimizer, not a shared closure.
    """

    def __init__(self, kernel: Callable[..., None]) -> None:
        self.kernel = kernel
        self._compiled: Callable[..., None] | None = None
        self._views: dict[int, Tensor] = {}  # long-lived tensors' views, as FlatViews

    def _view(self, t: Tensor, blocked: bool, keep: bool) -> Tensor:
        view = self._views.get(id(t)) if keep else None
        if view is None or view.data_ptr() != t.data_ptr() or view.numel() != t.numel():
            if blocked:
                view = t.view(-1, lowbit.BLOCK)
                torch._dynamo.mark_static(view, 1)
            else:
                view = t.view(-1)
            if keep:
                self._views[id(t)] = view
        return view

    def __call__(self, lists: list[list[Tensor]], hp: Tensor) -> None:
        if self._compiled is None:
            self._compiled = torch.compile(
                self.kernel, dynamic=True, fullgraph=True, options=KEEP_IN_REGISTERS
            )
        blocked = lists[2][0].dtype in CODE_DTYPES
        n_states = (len(lists) - 2) // 2 if blocked else len(lists) - 2
        with fx_config.patch(use_duck_shape=False):
            for i in range(len(lists[0])):
                # The gradients change every step: their views are not kept.
                args = [
                    self._view(column[i], blocked and j < 2 + n_states, keep=j != 1)
                    for j, column in enumerate(lists)
                ]
                self._compiled(*args, hp)
