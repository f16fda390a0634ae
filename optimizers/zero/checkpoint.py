"""ZeroOptimizer's two checkpoint formats.

**Sharded** (``save`` / ``load``): each rank writes what it owns, ``rank{r}.pt`` (its shards
of the parameters, in fp32 where the parameters are bf16/fp16, and their optimizer state, one
1-D tensor per bucket), and rank 0 writes ``index.json`` (names, shapes, the bucket layout).
Restoring is as sharded as training, at the same or another world size: a rank works out,
from the two layouts, which pieces of which saved rank's shards overlap its own, memory-maps
only those files and copies only those pieces, one saved chunk of one state key at a time,
so a restore holds little more than the rank's own share (bench/restore.py). The parameters
it does not own are then all-gathered from their owners, as after a step.

**Consolidated** (``consolidated_state_dict`` / ``load_consolidated_state_dict``): the
state dict of the plain optimizer over the whole model, as ``create_optimizer`` builds it in
one process: what a user downloads, and what loads at any world size and stage.

State keys are of three kinds: per element (one value per shard element: fp32, bf16, or
int8/uint8 codes, each in its own dtype), per block (``<key>_scale`` of int8 state: one fp32
absmax per ``lowbit.BLOCK`` elements, the layout being aligned so that a shard's blocks are
its parameters' own: elements [a, a+n) of a code buffer go with blocks
[a / BLOCK, ceil((a+n) / BLOCK)) of its scales), and scalars (the step count). Codes and
scales are copied as they are, bit for bit; only a consolidated state of another precision
is converted (``lowbit.decode`` / ``encode``, as the plain optimizer's load does).

Both read the optimizer through its public view (``ZeroOptimizer.shard_view``, see
``view``) and change it through ``load_shard_state`` and ``gather_parameters``; which saved
pieces land where is ``zero_layout.reshard``'s arithmetic.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import lowbit
from ..zero_layout import Bucket, Layout, Segment, reshard
from .collectives import wait

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer
    from .view import Shard, ShardView

# 2: classes record their state format and the layout may be aligned to lowbit.BLOCK.
VERSION = 2
READABLE = (1, 2)  # version 1: fp32 or bf16 state, unaligned, all of it per element


def index(opt: ZeroOptimizer) -> dict[str, Any]:
    """What ``index.json`` holds: the model's parameters and the layout of the shards."""
    view = opt.shard_view
    return {
        "version": VERSION,
        "world_size": view.layout.world_size,
        "stage": view.stage,
        "spec": opt.spec.model_dump(mode="json"),
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": str(p.dtype)} for p in view.params
        ],
        "block": lowbit.BLOCK,
        "classes": [
            {
                "state_format": cls.state_format,
                "buckets": [
                    {
                        "start": b.start,
                        "numel": b.numel,
                        "segments": [[s.index, s.offset, s.numel] for s in b.segments],
                    }
                    for b in buckets
                ],
            }
            for cls, buckets in zip(view.classes, view.layout.classes, strict=True)
        ],
    }


def _layout(saved: dict[str, Any]) -> Layout:
    """The layout that ``index.json`` records."""
    return Layout(
        saved["world_size"],
        tuple(
            tuple(
                Bucket(b["start"], b["numel"], tuple(Segment(*s) for s in b["segments"]))
                for b in cls["buckets"]
            )
            for cls in saved["classes"]
        ),
    )


@torch.no_grad()
def save(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    view = opt.shard_view
    os.makedirs(directory, exist_ok=True)
    payload = {
        "shards": [s.tensor.detach().clone() for s in view.shards],
        "state": [
            {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in view.state(s).items()
            }
            for s in view.shards
        ],
        "param_groups": view.hyperparameters(),
        "lookahead_step": None,  # read by checkpoints of the first version
        **view.counters(),
    }
    if view.layout.world_size > 1 or view.rank == 0:  # at stage 0 rank 0's copy is enough
        torch.save(payload, os.path.join(directory, f"rank{view.layout_rank}.pt"))
    if view.rank == 0:
        tmp = os.path.join(directory, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index(opt), f, indent=1)
        os.replace(tmp, os.path.join(directory, "index.json"))
    opt.comm.barrier()


def _check_compatible(opt: ZeroOptimizer, saved: dict[str, Any], where: str) -> None:
    ours = index(opt)["params"]
    if saved["params"] != ours:
        theirs = {(p["name"], tuple(p["shape"]), p["dtype"]) for p in saved["params"]}
        mine = {(p["name"], tuple(p["shape"]), p["dtype"]) for p in ours}
        diff = sorted(theirs ^ mine)[:3]
        raise ValueError(
            f"Checkpoint {where!r} is from another model (parameters that differ: {diff})"
        )
    if saved["spec"]["name"] != opt.spec.name:
        raise ValueError(
            f"Checkpoint {where!r} holds optimizer {saved['spec']['name']!r}, "
            f"this job uses {opt.spec.name!r}"
        )


def _sharded(v: Any) -> bool:
    """Whether a state value is a buffer cut with the shard (else a scalar: the step)."""
    return isinstance(v, Tensor) and v.ndim > 0


def _own_span(key: str, at: int, src: int, n: int) -> tuple[int, int, int]:
    """A run of ``n`` elements at ``at`` in one buffer and ``src`` in another, as a run of
    state ``key``'s own entries: the same, or for int8 scales the blocks that hold those
    elements (in an aligned layout every run starts on a block boundary)."""
    if not lowbit.is_scale(key):
        return at, src, n
    if at % lowbit.BLOCK or src % lowbit.BLOCK:
        raise ValueError(
            f"state {key!r}: a run of elements at {at} and {src} does not start on a block "
            f"boundary of {lowbit.BLOCK} (a layout that is not aligned cannot hold int8 state)"
        )
    return at // lowbit.BLOCK, src // lowbit.BLOCK, lowbit.num_blocks(n)


def _uninitialised(t: Tensor, key: str, fmt: str) -> dict[str, Tensor]:
    """State ``key`` of shard ``t`` in format ``fmt``, as ``lowbit.zeros`` makes it, but
    never written (so its pages are never touched)."""
    shapes = lowbit.zeros(t.to("meta"), key, fmt, t.dtype)
    return {k: torch.empty(v.shape, dtype=v.dtype, device=t.device) for k, v in shapes.items()}


@torch.no_grad()
def load(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    where = os.fspath(directory)
    with open(os.path.join(directory, "index.json")) as f:
        saved = json.load(f)
    if saved.get("version") not in READABLE:
        raise ValueError(f"Unsupported checkpoint version: {saved.get('version')!r}")
    _check_compatible(opt, saved, where)
    precision = saved["spec"].get("state_precision", "fp32")
    if precision != opt.spec.state_precision:
        raise ValueError(
            f"Checkpoint {where!r} holds {precision} optimizer state, this optimizer keeps "
            f"{opt.spec.state_precision}: load its consolidated state dict instead "
            "(load_consolidated_state_dict converts it)"
        )
    view = opt.shard_view
    world = saved["world_size"]
    layout = _layout(saved)
    if len(layout.classes) != len(view.layout.classes):  # the same parameters and spec
        raise ValueError(
            f"Checkpoint {where!r} has {len(layout.classes)} parameter classes, this "
            f"optimizer {len(view.layout.classes)}"
        )

    def read(r: int) -> dict[str, Any]:  # mapped, not read: only touched pages come in
        path = os.path.join(directory, f"rank{r}.pt")
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)

    # Per saved rank r: (our shard, at, r's shard, at, length) of each run to copy.
    copies = reshard(layout, view.layout, view.layout_rank)

    # Keys, their formats per class (a class's shards all keep the same) and scalars (the
    # step count), from the first saved rank.
    first = read(0)
    class_first_shard = [
        sum(len(b) for b in layout.classes[:c]) for c in range(len(layout.classes))
    ]
    formats = [
        {
            key: lowbit.state_format(entry, key)
            for key, v in entry.items()
            if _sharded(v) and not lowbit.is_scale(key)
        }
        for entry in (first["state"][k] for k in class_first_shard)
    ]
    keys = sorted({key for entry in first["state"] for key, v in entry.items() if _sharded(v)})
    scalars: dict[str, Any] = {}
    for entry in first["state"]:
        for key, v in entry.items():
            if not _sharded(v):
                scalars.setdefault(key, v.clone() if isinstance(v, Tensor) else v)
    groups = first["param_groups"]
    counters = {k: first[k] for k in view.counter_names if first.get(k) is not None}
    del first

    # The inner optimizer takes its state from a dict of placeholders in the saved formats
    # (so that its load copies them as they are rather than converting them): uninitialised,
    # they cost no memory until copied. Then the saved pieces go straight into the
    # optimizer's own tensors (padding stays zero).
    placeholders = {}
    for s in view.shards:
        entry = {key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()}
        for key, fmt in formats[s.cls].items():
            entry.update(_uninitialised(s.tensor, key, fmt))
        placeholders[s.number] = entry
    opt.load_shard_state(placeholders, groups, counters)
    del placeholders
    shards = [s.tensor for s in view.shards]
    state = [view.state(s) for s in view.shards]
    for entry in state:
        for key in keys:
            if key in entry:
                entry[key].zero_()

    # One saved shard (a bucket's chunk) of one key at a time: the file is mapped anew for
    # each, so the pages a restore has touched, and still holds mapped, stay ~one chunk.
    for key in ["param", *keys]:
        for r in range(world):
            by_saved: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
            for k, at, k_saved, src, n in copies[r]:
                by_saved[k_saved].append((k, at, src, n))
            for k_saved, pieces in by_saved.items():
                payload = read(r)
                if key == "param":
                    source = payload["shards"][k_saved]
                elif key in payload["state"][k_saved]:
                    source = payload["state"][k_saved][key]
                else:  # a key of another class's format (int8 scales)
                    continue
                for k, at, src, n in pieces:
                    dest = shards[k] if key == "param" else state[k][key]
                    at, src, n = _own_span(key, at, src, n)
                    dest[at : at + n].copy_(source[src : src + n])
                del payload, source
    opt.gather_parameters()  # the parameters other ranks own


@torch.no_grad()
def consolidated_state_dict(opt: ZeroOptimizer) -> dict[str, Any] | None:
    view = opt.shard_view
    full: dict[int, dict[str, Tensor]] = {}
    scalars: dict[str, Any] = {}
    for shard in view.shards:
        b = shard.bucket
        entry = view.state(shard)
        for key, v in entry.items():
            if not _sharded(v):
                scalars.setdefault(key, v)
        # Every rank holds the same keys for the same shard (its class's format).
        for key in sorted(k for k, v in entry.items() if _sharded(v)):
            local = entry[key]
            if view.stage == 0:
                gathered = local
            else:
                gathered = torch.empty(
                    local.numel() * view.world_size, dtype=local.dtype, device=local.device
                )
                gathered.chunk(view.world_size)[view.rank].copy_(local)
                wait(opt.comm.all_gather(gathered))
            if view.rank != 0:  # only rank 0 keeps the whole state
                continue
            for seg in b.segments:
                p = view.params[seg.index]
                _, start, n = _own_span(key, 0, seg.offset - b.start, seg.numel)
                value = gathered[start : start + n]
                if not lowbit.is_scale(key):
                    value = value.view(p.shape)
                full.setdefault(seg.index, {})[key] = value.to(p.device).clone()
    if view.rank != 0:
        return None
    state = {}
    for position, i in enumerate(view.plain_order()):
        state[position] = {
            **{k: v.clone() if isinstance(v, Tensor) else v for k, v in scalars.items()},
            **full.get(i, {}),
        }
    param_groups, start = [], 0
    for group, hyper in zip(view.groups, view.hyperparameters(), strict=True):
        positions = list(range(start, start + len(group.indices)))
        param_groups.append({**hyper, **group.options, "params": positions})
        start += len(group.indices)
    out: dict[str, Any] = {
        "state": state,
        "param_groups": param_groups,
        "max_grad_norm": opt.spec.max_grad_norm,
    }
    out.update(view.counters())
    return out


@torch.no_grad()
def load_consolidated_state_dict(opt: ZeroOptimizer, state_dict: Mapping[str, Any]) -> None:
    view = opt.shard_view
    groups = state_dict.get("param_groups")
    saved = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(saved, Mapping):
        raise ValueError("not an optimizer state dict (it has no 'state' and 'param_groups')")
    order = view.plain_order()
    positions = [pos for g in groups for pos in g.get("params", [])]
    if len(positions) != len(order):
        raise ValueError(
            f"the optimizer state holds {len(positions)} parameters, this model has {len(order)}"
        )
    pairs = zip(order, positions, strict=True)
    by_index = {i: saved.get(pos, saved.get(str(pos), {})) for i, pos in pairs}
    scalars: dict[str, Any] = {}
    for i, entry in by_index.items():
        p = view.params[i]
        for key, v in entry.items():
            if not _sharded(v):
                scalars.setdefault(key, v)
                continue
            expected = lowbit.num_blocks(p.numel) if lowbit.is_scale(key) else p.numel
            if v.numel() != expected:
                raise ValueError(
                    f"optimizer state {key!r} of parameter {p.name!r} has shape "
                    f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                )
    keys = sorted(
        {
            k
            for e in by_index.values()
            for k, v in e.items()
            if _sharded(v) and not lowbit.is_scale(k)
        }
    )
    new_state: dict[int, dict[str, Any]] = {}
    for shard in view.shards:
        entry: dict[str, Any] = {
            key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()
        }
        for key in keys:
            for i, *_ in shard.pieces:
                if key not in by_index[i]:
                    raise ValueError(f"parameter {view.params[i].name!r} has no {key!r} state")
            entry.update(_consolidated_pieces(view, shard, key, by_index))
        new_state[shard.number] = entry
    counters = {k: state_dict[k] for k in view.counter_names if state_dict.get(k) is not None}
    # The inner optimizer converts what is not in its own format (NestorOptimizer and
    # Lookahead's load_state_dict), rounding as the plain optimizer's load does.
    opt.load_shard_state(new_state, view.hyperparameters(), counters)


def _consolidated_pieces(
    view: ShardView, shard: Shard, key: str, by_index: Mapping[int, Mapping[str, Any]]
) -> dict[str, Tensor]:
    """State ``key`` of ``shard`` from the pieces of whole parameters' state it holds
    (``by_index[i]``: parameter i's entry of a plain optimizer's state dict), padding zero.

    In the format the pieces were saved in where they all agree, bit for bit: int8 codes
    and scales only where the shard's layout is aligned to blocks. Otherwise decoded to
    the shard's dtype (an int8 state loaded into an fp32 or bf16 optimizer, whose layout
    cuts blocks), for the inner optimizer's load to encode in its own format."""
    t = shard.tensor
    formats = {lowbit.state_format(by_index[i], key) for i, *_ in shard.pieces}
    fmt = formats.pop() if len(formats) == 1 else "fp32"
    if fmt == "int8" and view.classes[shard.cls].state_format != "int8":
        fmt = "fp32"
    out = lowbit.zeros(t, key, fmt, t.dtype)  # the padding stays zero
    for i, at, start, length in shard.pieces:
        source = by_index[i]
        if fmt == "fp32":
            value = lowbit.decode(dict(source), key, t.dtype).reshape(-1)[start : start + length]
            out[key][at : at + length] = value.to(t.device)
            continue
        for k in out:  # the codes (or bf16 values) and, for int8, their scales
            a, b, n = _own_span(k, at, start, length)
            out[k][a : a + n] = source[k].reshape(-1)[b : b + n].to(t.device)
    return out
