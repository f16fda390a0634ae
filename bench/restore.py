"""Restoring a ZeRO checkpoint at another world size: peak memory per rank.

A 50M-parameter model (twelve 2048x2048 layers) with Adan (4 fp32 state buffers per
parameter) trains one step at 4 ranks, ZeRO-2, and saves a sharded checkpoint. Then 2 ranks
(fresh processes, ZeRO-2) restore it, each contender in its own processes, interleaved round
by round:

  full rebuild   every rank reassembles the whole unsharded parameters and state from every
                 rank's file, then keeps its part (Nestor's first load_checkpoint)
  sharded        ZeroOptimizer.load_checkpoint: each rank maps only the files that overlap
                 its shards and copies only those pieces, then all-gathers the parameters

Per rank: the rank's own share (parameters, which every rank holds whole at ZeRO-1/2, plus
its shard of the optimizer state, fp32 masters if any), and the restore's peak: the
parameters plus the most the restore added to the process's RSS (Linux's VmHWM, reset at the
restore's start through /proc/self/clear_refs, less the RSS then). Target: peak <= 1.25x
the own share. Both contenders must restore the same
bytes (checked by a checksum of parameters and state).

    python bench/restore.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from optimizers import ZeroOptimizer  # noqa: E402
from optimizers.zero.collectives import end_process_group  # noqa: E402

WIDTH, LAYERS = 2048, 12
SPEC = {"name": "adan", "lr": 1e-3, "weight_decay": 0.02, "no_decay_1d": False}
CONTENDERS = ["full rebuild", "sharded"]
MiB = 2**20


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def status(field: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


@torch.no_grad()
def full_rebuild(opt: ZeroOptimizer, directory: str) -> None:
    """The restore before the sharded one: whole per-parameter tensors of every key on every rank,
    from every rank's whole file; then each rank takes its slices."""
    with open(os.path.join(directory, "index.json")) as f:
        index = json.load(f)
    world = index["world_size"]
    shapes = [tuple(p["shape"]) for p in index["params"]]
    full: list[dict[str, torch.Tensor]] = [{} for _ in shapes]
    scalars: dict = {}
    first: dict = {}
    for r in range(world):
        payload = torch.load(
            os.path.join(directory, f"rank{r}.pt"), weights_only=True, map_location="cpu"
        )
        if r == 0:
            first = payload
        k = 0
        for cls in index["classes"]:
            for b in cls["buckets"]:
                chunk = b["numel"] // world
                lo = b["start"] + r * chunk
                shard, state = payload["shards"][k], payload["state"][k]
                k += 1
                values = {
                    "param": shard,
                    **{
                        key: v
                        for key, v in state.items()
                        if isinstance(v, torch.Tensor) and v.ndim == 1 and v.numel() == chunk
                    },
                }
                for key, v in state.items():
                    if key not in values:
                        scalars.setdefault(key, v)
                for i, off, numel in b["segments"]:
                    a, e = max(lo, off), min(lo + chunk, off + numel)
                    if a >= e:
                        continue
                    for key, v in values.items():
                        dest = full[i].setdefault(
                            key, torch.zeros(math.prod(shapes[i]), dtype=v.dtype)
                        )
                        dest[a - off : e - off] = v[a - lo : e - lo]
    keys = sorted({k for f in full for k in f if k != "param"})
    new_state: dict[int, dict] = {}
    for s in opt.shard_view.shards:
        k = s.number
        for key in ["param", *keys]:
            dest = s.tensor if key == "param" else torch.zeros_like(s.tensor)
            for i, at, start, length in s.pieces:
                dest[at : at + length] = full[i][key][start : start + length].to(dest.dtype)
            if key != "param":
                new_state.setdefault(k, {})[key] = dest
        new_state.setdefault(k, {}).update(
            {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in scalars.items()}
        )
    with torch.no_grad():
        for i, p in enumerate(opt.params):
            p.copy_(full[i]["param"].view_as(p))
    opt.load_shard_state(new_state, first["param_groups"], {})


def checksum(model: torch.nn.Module, opt: ZeroOptimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    for state in opt.shard_view.hooks.states:
        for entry in state.values():
            for key in sorted(entry):
                v = entry[key]
                h.update(v.numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.hexdigest()[:16]


def save_worker(rank: int, world: int, init: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = make_model()
    opt = ZeroOptimizer(model.named_parameters(), SPEC, stage=2)
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    opt.step()
    opt.save_checkpoint(ckpt)
    end_process_group()


def restore_worker(rank: int, contender: str, init: str, ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model = make_model()
    opt = ZeroOptimizer(model.named_parameters(), SPEC, stage=2)
    dist.barrier()
    reset_peak()
    before = status("VmRSS")
    start = time.perf_counter()
    if contender == "sharded":
        opt.load_checkpoint(ckpt)
    else:
        full_rebuild(opt, ckpt)
        opt.gather_parameters()
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    own = params + opt.state_nbytes() + opt.master_nbytes()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(
            {
                "own": own,
                "params": params,
                "state": opt.state_nbytes(),
                "peak": params + peak - before,
                "rank": rank,
                "seconds": seconds,
                "checksum": checksum(model, opt),
            },
            f,
        )
    end_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        mp.spawn(save_worker, args=(4, os.path.join(tmp, "init-save"), ckpt), nprocs=4)
        size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
        results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for rnd in range(args.rounds):
            for contender in CONTENDERS:
                init = os.path.join(tmp, f"init-{rnd}-{contender.replace(' ', '-')}")
                out = os.path.join(tmp, f"out-{rnd}-{contender.replace(' ', '-')}")
                mp.spawn(restore_worker, args=(contender, init, ckpt, out), nprocs=2)
                for rank in range(2):
                    with open(f"{out}.{rank}.json") as f:
                        results[contender].append(json.load(f))
    sums = {
        rank: {r["checksum"] for rs in results.values() for r in rs if r["rank"] == rank}
        for rank in (0, 1)
    }
    nparams = sum(p.numel() for p in make_model().parameters())
    print(
        f"Restore of a 4-rank ZeRO-2 Adan checkpoint ({nparams / 1e6:.1f}M parameters, "
        f"{size / MiB:,.0f} MiB on disk) at 2 ranks, {args.rounds} rounds; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print()
    print("| contender | own share MiB | peak RSS MiB | peak / own share | seconds |")
    print("|---|---|---|---|---|")
    for contender, rs in results.items():
        own = statistics.median(r["own"] for r in rs)
        peak = max(r["peak"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        print(
            f"| {contender} | {own / MiB:,.0f} | {peak / MiB:,.0f} | {peak / own:.2f}x | "
            f"{secs:.2f} |"
        )
    print()
    print(
        "same parameters and state restored by both: "
        + ("yes" if all(len(v) == 1 for v in sums.values()) else f"NO ({sums})")
    )
    sharded = max(r["peak"] / r["own"] for r in results["sharded"])
    print(f"target: sharded peak <= 1.25x the own share: {'met' if sharded <= 1.25 else 'NOT met'}")


if __name__ == "__main__":
    main()
