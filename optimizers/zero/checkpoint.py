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

from ..zero_layout import Bucket, Layout, Segment, reshard
from .collectives import wait

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer

VERSION = 1


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
        "classes": [
            {
                "buckets": [
                    {
                        "start": b.start,
                        "numel": b.numel,
                        "segments": [[s.index, s.offset, s.numel] for s in b.segments],
                    }
                    for b in buckets
                ]
            }
            for buckets in view.layout.classes
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


@torch.no_grad()
def load(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    where = os.fspath(directory)
    with open(os.path.join(directory, "index.json")) as f:
        saved = json.load(f)
    if saved.get("version") != VERSION:
        raise ValueError(f"Unsupported checkpoint version: {saved.get('version')!r}")
    _check_compatible(opt, saved, where)
    view = opt.shard_view
    world = saved["world_size"]

    def read(r: int) -> dict[str, Any]:  # mapped, not read: only touched pages come in
        path = os.path.join(directory, f"rank{r}.pt")
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)

    # Per saved rank r: (our shard, at, r's shard, at, length) of each run to copy.
    copies = reshard(_layout(saved), view.layout, view.layout_rank)

    # Keys and scalars (the step count) from the first saved rank.
    first = read(0)
    chunk_sizes = [s.numel() for s in first["shards"]]
    keys = sorted(
        {
            key
            for k_saved, entry in enumerate(first["state"])
            for key, v in entry.items()
            if isinstance(v, Tensor) and v.ndim == 1 and v.numel() == chunk_sizes[k_saved]
        }
    )
    scalars: dict[str, Any] = {}
    for entry in first["state"]:
        for key, v in entry.items():
            if key not in keys:
                scalars.setdefault(key, v.clone() if isinstance(v, Tensor) else v)
    groups = first["param_groups"]
    counters = {k: first[k] for k in view.counter_names if first.get(k) is not None}
    del first

    # The inner optimizer takes its state from a dict of placeholders: its load_state_dict
    # copies what it is given (so it shares nothing with the caller), and uninitialised
    # placeholders are never touched, so that copy is the only state in memory. Then the
    # saved pieces go straight into the optimizer's own tensors (padding stays zero).
    placeholders = {
        s.number: {
            **{key: torch.empty_like(s.tensor) for key in keys},
            **{key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()},
        }
        for s in view.shards
    }
    opt.load_shard_state(placeholders, groups, counters)
    del placeholders
    shards = [s.tensor for s in view.shards]
    state = [view.state(s) for s in view.shards]
    for entry in state:
        for key in keys:
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
                else:
                    source = payload["state"][k_saved][key]
                for k, at, src, n in pieces:
                    dest = shards[k] if key == "param" else state[k][key]
                    dest[at : at + n].copy_(source[src : src + n])
                del payload, source
    opt.gather_parameters()  # the parameters other ranks own


@torch.no_grad()
def consolidated_state_dict(opt: ZeroOptimizer) -> dict[str, Any] | None:
    view = opt.shard_view
    keys = sorted(
        {
            k
            for s in view.shards
            for k, v in view.state(s).items()
            if isinstance(v, Tensor) and v.ndim == 1
        }
    )
    full: dict[int, dict[str, Tensor]] = {}
    scalars: dict[str, Any] = {}
    for shard in view.shards:
        b = shard.bucket
        entry = view.state(shard)
        for key, v in entry.items():
            if key not in keys:
                scalars.setdefault(key, v)
        for key in keys:
            local = entry[key]
            if view.stage == 0:
                gathered = local
            else:
                gathered = torch.empty(b.numel, dtype=local.dtype, device=local.device)
                gathered.chunk(view.world_size)[view.rank].copy_(local)
                wait(opt.comm.all_gather(gathered))
            if view.rank != 0:  # only rank 0 keeps the whole state
                continue
            for seg in b.segments:
                p = view.params[seg.index]
                start = seg.offset - b.start
                full.setdefault(seg.index, {})[key] = (
                    gathered[start : start + seg.numel].view(p.shape).to(p.device).clone()
                )
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
            if isinstance(v, Tensor) and v.ndim > 0:
                if v.numel() != p.numel:
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {p.name!r} has shape "
                        f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                    )
            else:
                scalars.setdefault(key, v)
    tensor_keys = sorted(
        {k for e in by_index.values() for k, v in e.items() if isinstance(v, Tensor) and v.ndim}
    )
    new_state: dict[int, dict[str, Any]] = {}
    for shard in view.shards:
        t = shard.tensor
        entry: dict[str, Any] = {
            key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()
        }
        entry.update({key: torch.zeros_like(t) for key in tensor_keys})  # padding: 0
        for i, at, start, length in shard.pieces:
            for key in tensor_keys:
                if key not in by_index[i]:
                    raise ValueError(f"parameter {view.params[i].name!r} has no {key!r} state")
                src = by_index[i][key].reshape(-1)[start : start + length]
                entry[key][at : at + length] = src.to(device=t.device, dtype=t.dtype)
        new_state[shard.number] = entry
    counters = {k: state_dict[k] for k in view.counter_names if state_dict.get(k) is not None}
    opt.load_shard_state(new_state, view.hyperparameters(), counters)
