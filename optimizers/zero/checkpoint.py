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
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .collectives import wait

if TYPE_CHECKING:
    from .optimizer import ZeroOptimizer

VERSION = 1


def index(opt: ZeroOptimizer) -> dict[str, Any]:
    return {
        "version": VERSION,
        "world_size": opt._plan_world,
        "stage": opt.stage,
        "spec": opt.spec.model_dump(mode="json"),
        "params": [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype)}
            for n, p in zip(opt.names, opt.params, strict=True)
        ],
        "classes": [
            {
                "buckets": [
                    {
                        "start": b.start,
                        "numel": b.numel,
                        "segments": [[s.index, s.offset, s.numel] for s in b.segments],
                    }
                    for b in c.buckets
                ]
            }
            for c in opt._classes
        ],
    }


@torch.no_grad()
def save(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    os.makedirs(directory, exist_ok=True)
    entries = opt._shard_entries()
    payload = {
        "shards": [s.detach().clone() for _, _, s in entries],
        "state": [
            {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in opt._merged_state(s).items()
            }
            for _, _, s in entries
        ],
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} for g in opt.inner.param_groups
        ],
        "lookahead_step": None,  # read by checkpoints of the first version
        **opt._hooks.counters(),
    }
    if opt._plan_world > 1 or opt.rank == 0:  # at stage 0 rank 0's copy is enough
        torch.save(payload, os.path.join(directory, f"rank{opt._plan_rank}.pt"))
    if opt.rank == 0:
        tmp = os.path.join(directory, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index(opt), f, indent=1)
        os.replace(tmp, os.path.join(directory, "index.json"))
    opt.comm.barrier()


def _saved_pieces(saved: dict[str, Any]) -> list[list[tuple[int, int, int, int, int]]]:
    """Per saved rank: (shard number in its file, parameter index, element offset within
    the parameter, length, offset within the shard) of every piece of a parameter that the
    rank's file holds."""
    world = saved["world_size"]
    out: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(world)]
    for r in range(world):
        k = 0
        for cls in saved["classes"]:
            for b in cls["buckets"]:
                chunk = b["numel"] // world
                lo = b["start"] + r * chunk
                for i, off, numel in b["segments"]:
                    a, e = max(lo, off), min(lo + chunk, off + numel)
                    if a < e:
                        out[r].append((k, i, a - off, e - a, a - lo))
                k += 1
    return out


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
    world = saved["world_size"]

    def read(r: int) -> dict[str, Any]:  # mapped, not read: only touched pages come in
        path = os.path.join(directory, f"rank{r}.pt")
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)

    # Which of this rank's shard elements each saved piece fills: parameter i's elements
    # [start, start + length) sit at ``at`` in our shard k (our layout) and at ``src`` in
    # saved shard k' of rank r (theirs).
    ours: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)  # i -> (k, at, start, n)
    for k, (c, bi, _) in enumerate(opt._shard_entries()):
        for i, at, start, length in c.buckets[bi].pieces(opt._plan_rank, opt._plan_world):
            ours[i].append((k, at, start, length))
    copies: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(world)]
    for r, pieces in enumerate(_saved_pieces(saved)):
        for k_saved, i, start, length, src in pieces:
            for k, at, s, n in ours.get(i, ()):
                a, e = max(start, s), min(start + length, s + n)
                if a < e:  # (our shard, at, saved shard, at, length)
                    copies[r].append((k, at + a - s, k_saved, src + a - start, e - a))

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
    counters = {k: first[k] for k in opt._hooks.counter_names if first.get(k) is not None}
    del first

    # The inner optimizer takes its state from a dict of placeholders: its load_state_dict
    # copies what it is given (so it shares nothing with the caller), and uninitialised
    # placeholders are never touched, so that copy is the only state in memory. Then the
    # saved pieces go straight into the optimizer's own tensors (padding stays zero).
    entries = opt._shard_entries()
    placeholders = {
        k: {
            **{key: torch.empty_like(s) for key in keys},
            **{key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()},
        }
        for k, (_, _, s) in enumerate(entries)
    }
    opt._load_inner(placeholders, groups, counters)
    del placeholders
    shards = [s for _, _, s in entries]
    state = [opt._merged_state(s) for s in shards]
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
    opt._gather_parameters()  # the parameters other ranks own


@torch.no_grad()
def consolidated_state_dict(opt: ZeroOptimizer) -> dict[str, Any] | None:
    keys = sorted(
        {
            k
            for s in opt._shard_entries()
            for k, v in opt._merged_state(s[2]).items()
            if isinstance(v, Tensor) and v.ndim == 1
        }
    )
    full: dict[int, dict[str, Tensor]] = {}
    scalars: dict[str, Any] = {}
    for c, bi, shard in opt._shard_entries():
        b = c.buckets[bi]
        entry = opt._merged_state(shard)
        for key, v in entry.items():
            if key not in keys:
                scalars.setdefault(key, v)
        for key in keys:
            local = entry[key]
            if opt.stage == 0:
                gathered = local
            else:
                gathered = torch.empty(b.numel, dtype=local.dtype, device=local.device)
                gathered.chunk(opt.world_size)[opt.rank].copy_(local)
                wait(opt.comm.all_gather(gathered))
            if opt.rank != 0:  # only rank 0 keeps the whole state
                continue
            for seg in b.segments:
                p = opt.params[seg.index]
                start = seg.offset - b.start
                full.setdefault(seg.index, {})[key] = (
                    gathered[start : start + seg.numel].view(p.shape).to(p.device).clone()
                )
    if opt.rank != 0:
        return None
    order = [i for group in opt._plain_groups for i in group]
    state = {}
    for position, i in enumerate(order):
        state[position] = {
            **{k: v.clone() if isinstance(v, Tensor) else v for k, v in scalars.items()},
            **full.get(i, {}),
        }
    param_groups, start = [], 0
    for group, options, inner_group in zip(
        opt._plain_groups, opt._group_options, opt.inner.param_groups, strict=True
    ):
        hyper = {k: v for k, v in inner_group.items() if k != "params"}
        positions = list(range(start, start + len(group)))
        param_groups.append({**hyper, **options, "params": positions})
        start += len(group)
    out: dict[str, Any] = {
        "state": state,
        "param_groups": param_groups,
        "max_grad_norm": opt.spec.max_grad_norm,
    }
    out.update(opt._hooks.counters())
    return out


@torch.no_grad()
def load_consolidated_state_dict(opt: ZeroOptimizer, state_dict: Mapping[str, Any]) -> None:
    groups = state_dict.get("param_groups")
    saved = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(saved, Mapping):
        raise ValueError("not an optimizer state dict (it has no 'state' and 'param_groups')")
    order = [i for group in opt._plain_groups for i in group]
    positions = [pos for g in groups for pos in g.get("params", [])]
    if len(positions) != len(order):
        raise ValueError(
            f"the optimizer state holds {len(positions)} parameters, this model has {len(order)}"
        )
    pairs = zip(order, positions, strict=True)
    by_index = {i: saved.get(pos, saved.get(str(pos), {})) for i, pos in pairs}
    scalars: dict[str, Any] = {}
    for i, entry in by_index.items():
        p = opt.params[i]
        for key, v in entry.items():
            if isinstance(v, Tensor) and v.ndim > 0:
                if v.numel() != p.numel():
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {opt.names[i]!r} has shape "
                        f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                    )
            else:
                scalars.setdefault(key, v)
    tensor_keys = sorted(
        {k for e in by_index.values() for k, v in e.items() if isinstance(v, Tensor) and v.ndim}
    )
    new_state: dict[int, dict[str, Any]] = {}
    for k, (c, bi, shard) in enumerate(opt._shard_entries()):
        entry: dict[str, Any] = {
            key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()
        }
        entry.update({key: torch.zeros_like(shard) for key in tensor_keys})  # padding: 0
        pieces = c.buckets[bi].pieces(opt._plan_rank, opt._plan_world)
        for i, at, start, length in pieces:
            for key in tensor_keys:
                if key not in by_index[i]:
                    raise ValueError(f"parameter {opt.names[i]!r} has no {key!r} state")
                src = by_index[i][key].reshape(-1)[start : start + length]
                entry[key][at : at + length] = src.to(device=shard.device, dtype=shard.dtype)
        new_state[k] = entry
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.inner.param_groups]
    counters = {k: state_dict[k] for k in opt._hooks.counter_names if state_dict.get(k) is not None}
    opt._load_inner(new_state, hyper, counters)
