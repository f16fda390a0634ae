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
from operator import is_not

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from . import lowbit
from ._common import state_dtype
from ._lowbit_kernels import entry_keys

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
class Run:
    """Neighbouring members of a ``Flat`` at the same step: their slices of the buffers and
    their one step count, a 0-d CPU tensor that every member's ``state[p]["step"]`` is
    (so ``state_dict()`` still gives each parameter its step, as torch does)."""

    step: Tensor
    buffers: list[Tensor]


@dataclass
class Flat:
    """A parameter group's parameters, their gradients and their optimizer state, each kept
    as views of one flat buffer (``buffers``: parameters, gradients, then one per state key),
    so that one compiled call steps them all."""

    params: list[Tensor]  # the group's parameters with gradients, as the step saw them
    members: list[Tensor]  # those living in the buffers, in order
    outside: list[Tensor]  # the rest of ``params``: stepped per tensor
    buffers: list[Tensor]
    offsets: list[int]
    state: dict[Tensor, dict] = field(default_factory=dict)  # the optimizer's, when bound
    entries: list[dict] = field(default_factory=list)  # each member's state entry
    ptrs: list[list[int]] = field(default_factory=list)  # where members' params, grads start
    views: list[list[Tensor]] = field(default_factory=list)  # each member's, per buffer
    keys: tuple[str, ...] = ()  # the state entries in buffers 2.., then "step"
    fmt: str = "fp32"  # the state's format (lowbit): int8 adds a buffer of scales per key
    ends: list[int] = field(default_factory=list)  # where each member's extent ends
    runs: list[Run] = field(default_factory=list)
    expected: list[Tensor] = field(default_factory=list)  # entries' tensors, member by key

    def advance(self) -> list[tuple[int, list[Tensor]]]:
        """Count a step: one add per run, not per parameter. Returns (step, buffers) per
        run, the step read from a CPU tensor (no device sync)."""
        out = []
        for run in self.runs:
            run.step.add_(1.0)
            out.append((int(run.step.item()), run.buffers))
        return out

    def home_state(self) -> None:
        """Put each member's state into the buffers (copying in what a load or the user put
        elsewhere, zeroing what is new) and group neighbouring members at the same step
        count into runs, each with one step tensor shared by its members' state. Members
        all at one step (the usual case) make one run of the whole buffers; a parameter
        that skipped steps cuts the run around it. Runs on first use and after a load only:
        it reads each member's step."""
        *state_keys, _ = self.keys
        for j, key in enumerate(state_keys, start=2):
            for entry, view in zip(self.entries, self.views[j], strict=True):
                old = entry.get(key)
                if old is not view:
                    view.copy_(old) if old is not None else view.zero_()
                    entry[key] = view
        bounds: list[list] = []  # [step, first offset, end offset]
        for entry, offset, end in zip(self.entries, self.offsets, self.ends, strict=True):
            step = float(entry["step"]) if "step" in entry else 0.0
            if bounds and bounds[-1][0] == step:
                bounds[-1][2] = end
            else:
                bounds.append([step, offset, end])
        whole = len(bounds) == 1
        # Scale buffers hold one entry per BLOCK elements (members start on block bounds).
        per = [lowbit.BLOCK if lowbit.is_scale(k) else 1 for k in ("", "", *state_keys)]
        self.runs = [
            Run(
                torch.tensor(step),
                self.buffers
                if whole
                else [b[lo // d : hi // d] for b, d in zip(self.buffers, per, strict=True)],
            )
            for step, lo, hi in bounds
        ]
        i = 0
        for entry, offset in zip(self.entries, self.offsets, strict=True):
            if offset >= bounds[i][2]:
                i += 1
            entry["step"] = self.runs[i].step
        self.expected = [e[k] for e in self.entries for k in self.keys]


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

    The steady-state step does no per-parameter tensor work: the members of a run share one
    step count (``Run``), advanced by one add, and the checks are pointer and identity
    comparisons.

    Only parameters that own their storage and are contiguous are moved: a view into
    another owner's buffer (ZeroOptimizer's shards, a parameter already bucketed elsewhere),
    parameters sharing one storage and shared-memory (Hogwild) CPU parameters stay where
    they are and are stepped per tensor. Another tensor that aliases a moved parameter's old
    storage (``w = p.data`` kept aside) no longer sees its updates, as with torch's
    bucket views; pass ``fused=False`` where that matters.
    """

    def __init__(self) -> None:
        self._flats: dict[int, Flat] = {}  # by parameter group index

    def bind(
        self,
        index: int,
        params: list[Tensor],
        state: dict[Tensor, dict],
        keys: tuple[str, ...],
        fmt: str = "fp32",
    ) -> Flat | None:
        """The flat buffers of group ``index``'s ``params`` (those with gradients this step),
        made or refreshed; state entries still empty are created here (zeroed views and a
        ``step`` of 0). None when no parameter can be moved. ``fmt`` is the state's format
        (``lowbit``): bf16 buffers, or int8/uint8 codes and a buffer of block scales per key,
        each member starting on a block boundary so that no block straddles two members."""
        flat = self._flats.get(index)
        if (
            flat is None
            or flat.keys[:-1] != entry_keys(keys, fmt)
            or len(flat.params) != len(params)
            or any(a is not b for a, b in zip(flat.params, params, strict=True))
        ):
            flat = self._make(index, params, state, keys, fmt)
            if flat is None:
                return None
        members = flat.members
        if flat.state is not state:  # a new state dict (load_state_dict): look entries up
            flat.state = state
            flat.entries = [state[p] for p in members]
            flat.expected = []
        current = [[p.data_ptr() for p in members], [p.grad.data_ptr() for p in members]]
        if current != flat.ptrs:
            for j, (now, home) in enumerate(zip(current, flat.ptrs, strict=True)):
                moved = [i for i in range(len(members)) if now[i] != home[i]]
                if not moved:
                    continue
                views = [flat.views[j][i] for i in moved]
                if j == 0 and any(
                    _changed(members[i], view) for i, view in zip(moved, views, strict=True)
                ):
                    # Given new data of another dtype, device or shape (model.half(), a
                    # resize): make the buffers again rather than copy it back into the old.
                    flat.params = []
                    return self.bind(index, params, state, keys, fmt)
                if j == 0:
                    torch._foreach_copy_(views, [members[i].detach() for i in moved])
                    for i, view in zip(moved, views, strict=True):
                        members[i].data = view
                else:  # one multi-tensor copy: new gradients every step are the norm
                    torch._foreach_copy_(views, [members[i].grad for i in moved])
                    for i, view in zip(moved, views, strict=True):
                        members[i].grad = view
        # The state and the step counts are where they were put unless someone replaced
        # them (a load): one identity check per member and key, no tensor work.
        found = [e.get(k) for e in flat.entries for k in flat.keys]
        if len(found) != len(flat.expected) or any(map(is_not, found, flat.expected)):
            flat.home_state()
        return flat

    def _make(
        self,
        index: int,
        params: list[Tensor],
        state: dict[Tensor, dict],
        keys: tuple[str, ...],
        fmt: str,
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
            # state, and a step count of their own), so that the old buffers are freed.
            for p in old.members:
                if id(p) not in chosen:
                    p.data = p.detach().clone()
                    if p.grad is not None:
                        p.grad = p.grad.clone()
                    entry = state.get(p, {})
                    for key in old.keys:
                        if key in entry:
                            entry[key] = entry[key].clone()
        if not members:
            return None
        align = lowbit.BLOCK if fmt == "int8" else 1
        offsets = [0]
        for p in members:
            offsets.append(offsets[-1] + -(-p.numel() // align) * align)
        total = offsets.pop()
        names = entry_keys(keys, fmt)
        dtypes = [like.dtype, like.dtype] + [_buffer_dtype(key, fmt, like) for key in names]
        # Low-bit state is for memory: its buffers are staggered only where the padding is
        # small beside them (1/64), not a small model's whole state again.
        share = None if fmt == "fp32" else 1 / 64
        buffers = [
            _staggered(total, dtype, like.device, j, share) for j, dtype in enumerate(dtypes)
        ]
        if fmt != "fp32":  # padding between members stays zero: it is stepped, and encoded
            for j, key in enumerate(names, start=2):
                if lowbit.is_scale(key):
                    buffers[j] = torch.zeros(total // align, device=like.device)
            for b in buffers:
                b.zero_()
        outside = [p for p in params if id(p) not in chosen]
        flat = Flat(
            list(params), members, outside, buffers, offsets, keys=(*names, "step"), fmt=fmt
        )
        flat.ends = [*offsets[1:], total]
        flat.views = [
            [_member_view(b, o, p, key) for p, o in zip(members, offsets, strict=True)]
            for b, key in zip(buffers, ("", "", *names), strict=True)
        ]
        flat.ptrs = [[b.data_ptr() + o * b.element_size() for o in offsets] for b in buffers[:2]]
        self._flats[index] = flat
        return flat


# Each flat buffer starts this many bytes times its index into its own allocation.
STAGGER_BYTES = 1 << 16


def _staggered(
    numel: int, dtype: torch.dtype, device: torch.device, index: int, share: float | None = None
) -> Tensor:
    """An uninitialised 1-D buffer starting ``index * STAGGER_BYTES`` into its allocation.

    Large allocations come from the system page-aligned and at similar addresses modulo large
    powers of two, so the six streams of an Adan step would hit the same memory banks. On
    this machine's CPU that made a 16M-parameter step 2.0-2.3x fused AdamW's; staggered, 1.6x
    (bench/optimizers.py). The padding costs at most a few hundred KiB per group; with
    ``share``, none where it would exceed that share of the buffer."""
    pad = index * STAGGER_BYTES // torch.empty((), dtype=dtype).element_size()
    if share is not None and pad > share * numel:
        pad = 0
    return torch.empty(pad + numel, dtype=dtype, device=device)[pad:]


def _buffer_dtype(key: str, fmt: str, like: Tensor) -> torch.dtype:
    """The dtype of state entry ``key``'s flat buffer in format ``fmt`` (see lowbit.zeros)."""
    if fmt == "fp32":
        return state_dtype(like)
    if fmt == "bf16":
        return torch.bfloat16
    if lowbit.is_scale(key):
        return torch.float32
    return torch.uint8 if key in lowbit.NON_NEGATIVE else torch.int8


def _member_view(buffer: Tensor, offset: int, p: Tensor, key: str) -> Tensor:
    """Member ``p``'s part of ``buffer``: of p's shape, or its block scales."""
    if lowbit.is_scale(key):
        first = offset // lowbit.BLOCK
        return buffer[first : first + lowbit.num_blocks(p.numel())]
    return buffer[offset : offset + p.numel()].view(p.shape)


def _changed(param: Tensor, view: Tensor) -> bool:
    return param.dtype != view.dtype or param.device != view.device or param.shape != view.shape


def _owns(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor that is the whole of its own storage (not a view into
    someone's buffer, nor a subclass such as DTensor that has no storage of its own)."""
    return (
        type(t) in (Tensor, torch.nn.Parameter)
        and not t._is_view()
        # Shared memory (Hogwild) is a CPU notion: is_shared() is True for every CUDA tensor.
        and not (t.device.type == "cpu" and t.is_shared())
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
