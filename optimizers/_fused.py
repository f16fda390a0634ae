"""Compiled elementwise optimizer kernels: one torch.compile graph serves every tensor size.

An elementwise update (Adan, AdamW) is memory-bound: the fastest step reads and writes each
buffer once. ``FusedKernel`` compiles the per-tensor update with torch.compile (C++/OpenMP on
CPU, Triton on GPU) over flattened tensors with dynamic sizes, so one compile serves any
model. ``FlatStore`` keeps a parameter group's parameters, gradients and state in flat
buffers, so that a model of 200 tensors is stepped by one compiled call, not 200 (each call
costs ~0.1-0.25 ms of dynamo guards and wrappers before its kernel runs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from ._common import state_dtype

# Below this many elements a tensor outside the flat buffers is stepped by the foreach path:
# a compiled call costs more Python overhead than the tensor's own update.
MIN_NUMEL = 4096


class FusedKernel:
    """Applies ``kernel(*tensors, hp)`` to lists of tensors, compiled, one call per tensor.

    ``kernel`` takes one 1-D tensor from each list plus ``hp``, a 1-D tensor of
    hyperparameters, and updates its arguments in place. Every list must hold contiguous
    tensors of matching sizes; dtypes may differ between lists (bf16 params, fp32 state).
    """

    def __init__(self, kernel: Callable[..., None]) -> None:
        self.kernel = kernel
        # Made on first use: torch.compile imports dynamo (seconds), which importing an
        # optimizer, or stepping one that never fuses, should not pay.
        self._compiled: Callable[..., None] | None = None

    def __call__(
        self, lists: list[list[Tensor]], hp: Tensor, views: FlatViews | None = None
    ) -> None:
        """Run the kernel over ``lists``; ``views`` caches the 1-D views of the lists after
        the second (the gradients change every step, parameters and state do not)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.kernel, dynamic=True, fullgraph=True)
        views = views if views is not None else FlatViews()
        columns = [
            [t.view(-1) for t in column] if j == 1 else views.flat(column)
            for j, column in enumerate(lists)
        ]
        # Without duck sizing, a size that happens to equal hp's is not assumed equal to it.
        with fx_config.patch(use_duck_shape=False):
            for i in range(len(columns[0])):
                self._compiled(*(column[i] for column in columns), hp)


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


@dataclass
class Flat:
    """A parameter group's parameters, their gradients and their optimizer state, each kept
    as views of one flat buffer (``buffers``: parameters, gradients, then one per state key),
    so that one compiled call steps them all."""

    params: list[Tensor]  # the group's parameters with gradients, as the step saw them
    members: list[Tensor]  # those living in the buffers, in order (the rest: per tensor)
    buffers: list[Tensor]
    offsets: list[int]
    ptrs: list[list[int]] = field(default_factory=list)  # where each member's views start
    views: list[list[Tensor]] = field(default_factory=list)  # each member's, per buffer

    def split(
        self, buckets: dict[int, list[Tensor]]
    ) -> tuple[list[tuple[int, list[Tensor]]], dict[int, list[Tensor]]]:
        """Cut ``buckets`` (parameters by step count, from ``advance_steps``) into runs of
        neighbouring members at the same step, as slices of the buffers, and the buckets of
        the parameters outside them. Members all at one step (the usual case) make one run
        of the whole buffers; a parameter that skipped a step cuts the run around it."""
        step_of = {id(p): step for step, ps in buckets.items() for p in ps}
        bounds: list[list[int]] = []  # [step, first offset, end offset]
        for p, offset in zip(self.members, self.offsets, strict=True):
            step = step_of[id(p)]
            if bounds and bounds[-1][0] == step:
                bounds[-1][2] = offset + p.numel()
            else:
                bounds.append([step, offset, offset + p.numel()])
        whole = len(bounds) == 1
        runs = [
            (st, self.buffers if whole else [b[lo:hi] for b in self.buffers])
            for st, lo, hi in bounds
        ]
        inside = {id(p) for p in self.members}
        rest = {}
        for step, ps in buckets.items():
            outside = [p for p in ps if id(p) not in inside]
            if outside:
                rest[step] = outside
        return runs, rest


class FlatStore:
    """Moves each parameter group's parameters, gradients and state into flat buffers on its
    first fused step, as torch's ZeroRedundancyOptimizer(parameters_as_bucket_view=True) and
    DDP(gradient_as_bucket_view=True) do, and keeps them there.

    ``p.data`` becomes a view of the parameter buffer, ``p.grad`` of the gradient buffer and
    each state tensor of its own buffer; shapes, identities and values are unchanged. Each
    step checks where the tensors live and copies back in whatever left: a gradient made
    afresh by backward after ``zero_grad()`` (set_to_none=True) is copied in, costing one
    more read and write of the gradients; ``zero_grad(set_to_none=False)`` keeps the views,
    and backward accumulates straight into the buffer. State loaded from a checkpoint is
    copied in the same way.

    Only parameters that own their storage and are contiguous are moved: a view into
    another owner's buffer (ZeroOptimizer's shards, a parameter already bucketed elsewhere),
    parameters sharing one storage and shared-memory (Hogwild) parameters stay where they
    are and are stepped per tensor. Another tensor that aliases a moved parameter's old
    storage (``w = p.data`` kept aside) no longer sees its updates, as with torch's
    bucket views; pass ``fused=False`` where that matters.
    """

    def __init__(self) -> None:
        self._flats: dict[int, Flat] = {}  # by parameter group index

    def bind(
        self, index: int, params: list[Tensor], state: dict[Tensor, dict], keys: tuple[str, ...]
    ) -> Flat | None:
        """The flat buffers of group ``index``'s ``params`` (those with gradients this step),
        made or refreshed; state entries still empty are created here (zeroed views and a
        ``step`` of 0). None when no parameter can be moved."""
        flat = self._flats.get(index)
        if (
            flat is None
            or len(flat.params) != len(params)
            or any(a is not b for a, b in zip(flat.params, params, strict=True))
        ):
            flat = self._make(index, params, state, keys)
            if flat is None:
                return None
        members = flat.members
        current = [
            [p.data_ptr() for p in members],
            [p.grad.data_ptr() for p in members],
            *([state[p][k].data_ptr() if k in state[p] else 0 for p in members] for k in keys),
        ]
        if current == flat.ptrs:
            return flat
        for j, (now, home) in enumerate(zip(current, flat.ptrs, strict=True)):
            moved = [i for i in range(len(members)) if now[i] != home[i]]
            if not moved:
                continue
            views = [flat.views[j][i] for i in moved]
            if j == 0:
                if any(_changed(members[i], view) for i, view in zip(moved, views, strict=True)):
                    # Given new data of another dtype, device or shape (model.half(), a
                    # resize): make the buffers again rather than copy it back into the old.
                    flat.params = []
                    return self.bind(index, params, state, keys)
                torch._foreach_copy_(views, [members[i].detach() for i in moved])
                for i, view in zip(moved, views, strict=True):
                    members[i].data = view
            elif j == 1:  # one multi-tensor copy: new gradients every step are the norm
                torch._foreach_copy_(views, [members[i].grad for i in moved])
                for i, view in zip(moved, views, strict=True):
                    members[i].grad = view
            else:
                key = keys[j - 2]
                for i, view in zip(moved, views, strict=True):
                    entry = state[members[i]]
                    entry.setdefault("step", torch.tensor(0.0))
                    old = entry.get(key)
                    view.copy_(old) if old is not None else view.zero_()
                    entry[key] = view
        return flat

    def _make(
        self, index: int, params: list[Tensor], state: dict[Tensor, dict], keys: tuple[str, ...]
    ) -> Flat | None:
        old = self._flats.pop(index, None)
        homed = {id(p) for p in old.members} if old is not None else set()
        movable = [
            p
            for p in params
            if p.is_contiguous() and not p.grad.is_sparse and (id(p) in homed or _owns(p))
        ]
        # Parameters tied through their storage (``b.data = a.data``) stay tied, where they are.
        storages = Counter(p.untyped_storage().data_ptr() for p in movable)
        movable = [p for p in movable if storages[p.untyped_storage().data_ptr()] == 1]
        like = movable[0] if movable else None
        members = [p for p in movable if p.dtype == like.dtype and p.device == like.device]
        chosen = {id(p) for p in members}
        if old is not None:
            # Parameters leaving the buffers take their own storage again (data, gradient,
            # state), so that the old buffers are freed.
            for p in old.members:
                if id(p) not in chosen:
                    p.data = p.detach().clone()
                    if p.grad is not None:
                        p.grad = p.grad.clone()
                    entry = state.get(p, {})
                    for key in keys:
                        if key in entry:
                            entry[key] = entry[key].clone()
        if not members:
            return None
        offsets = [0]
        for p in members:
            offsets.append(offsets[-1] + p.numel())
        total = offsets.pop()
        dtypes = [like.dtype, like.dtype] + [state_dtype(like)] * len(keys)
        buffers = [_staggered(total, dtype, like.device, j) for j, dtype in enumerate(dtypes)]
        flat = Flat(list(params), members, buffers, offsets)
        flat.views = [
            [b[o : o + p.numel()].view(p.shape) for p, o in zip(members, offsets, strict=True)]
            for b in buffers
        ]
        flat.ptrs = [[b.data_ptr() + o * b.element_size() for o in offsets] for b in buffers]
        self._flats[index] = flat
        return flat


# Each flat buffer starts this many bytes times its index into its own allocation.
STAGGER_BYTES = 1 << 16


def _staggered(numel: int, dtype: torch.dtype, device: torch.device, index: int) -> Tensor:
    """An uninitialised 1-D buffer starting ``index * STAGGER_BYTES`` into its allocation.

    Large allocations come from the system page-aligned and at similar addresses modulo large
    powers of two, so the six streams of an Adan step would hit the same memory banks. On
    this machine's CPU that made a 16M-parameter step 2.0-2.3x fused AdamW's; staggered, 1.6x
    (bench/optimizers.py). The padding costs at most a few hundred KiB per group."""
    pad = index * STAGGER_BYTES // torch.empty((), dtype=dtype).element_size()
    return torch.empty(pad + numel, dtype=dtype, device=device)[pad:]


def _changed(param: Tensor, view: Tensor) -> bool:
    return param.dtype != view.dtype or param.device != view.device or param.shape != view.shape


def _owns(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor that is the whole of its own storage (not a view into
    someone's buffer, nor a subclass such as DTensor that has no storage of its own)."""
    return (
        type(t) in (Tensor, torch.nn.Parameter)
        and not t._is_view()
        and not t.is_shared()
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


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
