"""What each rank runs in the ZeroOptimizer tests (spawned processes, gloo on loopback).

Every scenario trains the same small model on the same sequence of global batches; each
rank takes its own part of every batch in micro-batches. Rank 0 also trains the model in
one process with the plain optimizer on the whole batch, and records how far apart the two
end up. Results go to ``out_dir/world{W}.json`` for the pytest side to assert on.

Scenarios are isolated: one that raises records its traceback under its own name (on every
rank that raised, ``world{W}-errors-rank{r}.json``) and the next one runs, so a bug that
raises on every rank is one scenario's failing tests, not an error in every test of the
matrix. One that raises on some ranks only leaves the others inside a collective: they time
out (120 s) and the later scenarios of that world size fail with it (measured: an error
injected on rank 1 of one LAMB scenario failed the LAMB and Lookahead scenarios after it).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from optimizers import ZeroOptimizer, create_optimizer
from optimizers.zero.collectives import end_process_group

GLOBAL_BATCH = 24
ACCUMULATION = 2
STEPS = 20
# ~100 fp32 elements per bucket: several buckets, parameters cut between ranks.
BUCKET_MB = 400 / 2**20

BF16 = torch.bfloat16

# (name, spec, stage, dtype)
SCENARIOS: list[tuple[str, dict[str, Any], int, torch.dtype]] = (
    [
        (
            f"{opt}-stage{stage}-fp64",
            {"name": opt, "lr": 0.02, "weight_decay": 0.05, "max_grad_norm": 0.5},
            stage,
            torch.float64,
        )
        for opt in ("adan", "adamw", "lamb", "lookahead_adan")
        for stage in (1, 2)
    ]
    + [
        ("adan-stage0-fp64", {"name": "adan", "lr": 0.02, "max_grad_norm": 0.5}, 0, torch.float64),
        ("amsgrad-stage2-fp64", {"name": "amsgrad", "lr": 0.02}, 2, torch.float64),
        ("adan-stage2-fp32", {"name": "adan", "lr": 0.02, "max_grad_norm": 0.5}, 2, torch.float32),
        ("lamb-stage1-fp32", {"name": "lamb", "lr": 0.02}, 1, torch.float32),
    ]
    + [  # bf16 parameters, fp32 master weights and state
        (f"{opt}-stage{stage}-bf16", {"name": opt, "lr": 0.02, "max_grad_norm": 0.5}, stage, BF16)
        for opt in ("adan", "adamw")
        for stage in (1, 2)
    ]
)


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 13),
        torch.nn.Tanh(),
        torch.nn.Linear(13, 11),
        torch.nn.LayerNorm(11),
        torch.nn.Linear(11, 3),
    )
    return model.to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 7, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(GLOBAL_BATCH, 3, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def zero_steps(model, opt, rank: int, world: int, dtype, first: int, last: int) -> None:
    micro = GLOBAL_BATCH // (world * ACCUMULATION)
    for step in range(first, last):
        x, y = batch(step, dtype)
        opt.zero_grad()
        for j in range(ACCUMULATION):
            lo = (rank * ACCUMULATION + j) * micro
            loss = F.mse_loss(model(x[lo : lo + micro]), y[lo : lo + micro]) / ACCUMULATION
            loss.backward()
        opt.step()


def plain_steps(model, opt, dtype, first: int, last: int) -> None:
    for step in range(first, last):
        x, y = batch(step, dtype)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def master_steps(model, spec: dict[str, Any], first: int, last: int):
    """Mixed precision in one process, the textbook way: forward and backward in the
    model's bf16, the plain optimizer stepping fp32 master copies, the parameters rounded
    from them after every step. Returns the optimizer (over the masters)."""
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    named = [(n, m) for (n, _), m in zip(model.named_parameters(), masters, strict=True)]
    opt = create_optimizer(named, spec)
    for step in range(first, last):
        x, y = batch(step, BF16)
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        for p, m in zip(model.parameters(), masters, strict=True):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters, strict=True):
                p.copy_(m)
    return opt


def reference(spec: dict[str, Any], dtype: torch.dtype, with_state_bytes: bool = False):
    """Parameters after STEPS plain single-process steps (and the state's size)."""
    model = make_model(dtype)
    if dtype == BF16:
        opt = master_steps(model, spec, 0, STEPS)
    else:
        opt = create_optimizer(model.named_parameters(), spec)
        plain_steps(model, opt, dtype, 0, STEPS)
    params = [p.detach().clone() for p in model.parameters()]
    if not with_state_bytes:
        return params
    states = [opt.state] + ([opt.base_optimizer.state] if hasattr(opt, "base_optimizer") else [])
    nbytes = sum(
        v.nbytes
        for s in states
        for e in s.values()
        for v in e.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )
    return params, nbytes


def mean_diff(model: torch.nn.Module, expected: list[torch.Tensor]) -> float:
    diffs = [
        (p.detach().double() - e.double()).abs().reshape(-1)
        for p, e in zip(model.parameters(), expected, strict=True)
    ]
    return torch.cat(diffs).mean().item()


def max_diff(model: torch.nn.Module, expected: list[torch.Tensor]) -> float:
    return max(
        (p.detach().double() - e.double()).abs().max().item()
        for p, e in zip(model.parameters(), expected, strict=True)
    )


def isolated(errors: dict[str, str], name: str, run: Callable[[], None]) -> None:
    """Run one scenario; an exception is recorded under its name and the next one runs
    (a rank that raised inside a collective makes the others time out, see ``worker``)."""
    try:
        run()
    except Exception:
        errors[name] = traceback.format_exc()


def equality(rank: int, world: int, results: dict[str, Any], errors: dict[str, str]) -> None:
    for name, spec, stage, dtype in SCENARIOS:
        isolated(
            errors, name, lambda a=(name, spec, stage, dtype): _equal(rank, world, results, *a)
        )


def _equal(rank, world, results, name, spec, stage, dtype) -> None:
    model = make_model(dtype)
    opt = ZeroOptimizer(model.named_parameters(), spec, stage=stage, bucket_mb=BUCKET_MB)
    zero_steps(model, opt, rank, world, dtype, 0, STEPS)
    state = torch.tensor([opt.state_nbytes()], dtype=torch.int64)
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    opt.close()
    if rank == 0:
        expected, unsharded_bytes = reference(spec, dtype, with_state_bytes=True)
        results[name] = {
            "max_diff": max_diff(model, expected),
            "mean_diff": mean_diff(model, expected),
            "state_bytes_per_rank": [int(s.item()) for s in states],
            "unsharded_state_bytes": unsharded_bytes,
            "padded_numel": opt.shard_view.layout.numel,
            "grad_norm": float(opt.last_grad_norm),
            "master_bytes": opt.master_nbytes(),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }


OVERLAP_SPECS = {
    "adan-stage1": ({"name": "adan", "lr": 0.02, "weight_decay": 0.05, "max_grad_norm": 0.5}, 1),
    "adan-stage2": ({"name": "adan", "lr": 0.02, "weight_decay": 0.05, "max_grad_norm": 0.5}, 2),
    "lamb-stage2": ({"name": "lamb", "lr": 0.02}, 2),
}


def overlap(rank: int, world: int, results: dict[str, Any], errors: dict[str, str]) -> None:
    for name, (spec, stage) in OVERLAP_SPECS.items():
        isolated(
            errors,
            f"overlap-{name}",
            lambda a=(name, spec, stage): _overlap(rank, world, results, *a),
        )


def _overlap(rank, world, results, name, spec, stage) -> None:
    """The same training with the all-gather overlapped with the next forward pass and
    without: bit-identical parameters; and the all-gather really was still in flight
    when step() returned."""
    runs, in_flight = [], []
    for overlapped in (False, True):
        model = make_model(torch.float64)
        opt = ZeroOptimizer(model.named_parameters(), spec, stage=stage, bucket_mb=BUCKET_MB)
        if overlapped:
            opt.overlap_with(model)
        micro = GLOBAL_BATCH // (world * ACCUMULATION)
        for step in range(STEPS):
            x, y = batch(step, torch.float64)
            opt.zero_grad()
            for j in range(ACCUMULATION):
                lo = (rank * ACCUMULATION + j) * micro
                F.mse_loss(model(x[lo : lo + micro]), y[lo : lo + micro]).backward()
            opt.step()
            if overlapped:
                in_flight.append(opt.gathers_in_flight)
        opt.close()  # waits for the last all-gather
        runs.append([p.detach().clone() for p in model.parameters()])
    if rank == 0:
        results[f"overlap-{name}"] = {
            "identical": all(torch.equal(a, b) for a, b in zip(*runs, strict=True)),
            "buckets_in_flight_after_step": max(in_flight),
            "buckets": len(opt.shard_view.layout.buckets),
        }


CHECKPOINT_SPECS = {
    "adan-stage2": ({"name": "adan", "lr": 0.02, "weight_decay": 0.05, "max_grad_norm": 0.5}, 2),
    "lookahead_lamb-stage1": ({"name": "lookahead_lamb", "lr": 0.02}, 1),
}


def checkpoints(
    rank: int, world: int, ckpt_dir: str, results: dict[str, Any], errors: dict[str, str]
) -> None:
    """World 4 and 3 save after 10 steps; 1 and 2 load (4 -> 1, 3 -> 2) and finish."""
    dtype = torch.float64
    source = {1: 4, 2: 3}.get(world)

    def one(name: str, spec: dict[str, Any], stage: int) -> None:
        model = make_model(dtype)
        opt = ZeroOptimizer(model.named_parameters(), spec, stage=stage, bucket_mb=BUCKET_MB)
        if source is None:
            zero_steps(model, opt, rank, world, dtype, 0, STEPS // 2)
            opt.save_checkpoint(os.path.join(ckpt_dir, f"{name}-world{world}"))
            zero_steps(model, opt, rank, world, dtype, STEPS // 2, STEPS)
        else:
            opt.load_checkpoint(os.path.join(ckpt_dir, f"{name}-world{source}"))
            zero_steps(model, opt, rank, world, dtype, STEPS // 2, STEPS)
        if rank == 0:
            results[f"ckpt-{name}"] = {
                "max_diff": max_diff(model, reference(spec, dtype)),
                "from_world": source or world,
            }
        opt.close()

    for name, (spec, stage) in CHECKPOINT_SPECS.items():
        isolated(errors, f"ckpt-{name}", lambda a=(name, spec, stage): one(*a))


def _memory(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def restore_memory(
    rank: int, world: int, ckpt_dir: str, results: dict[str, Any], errors: dict[str, str]
) -> None:
    """The sharded restore's memory, as bench/restore.py measures it at 50M parameters but
    at 8M: world 4 saves an Adan ZeRO-2 checkpoint, world 2 restores it. Per rank: its own
    share (parameters, held whole at stage 2, plus its shard of the state) and the restore's
    peak (the parameters plus the most the restore added to RSS: VmHWM reset at the start)."""
    if world not in (4, 2):
        return
    path = os.path.join(ckpt_dir, "memory-world4")
    spec = {"name": "adan", "lr": 1e-3, "weight_decay": 0.02}

    def one() -> None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
        opt = ZeroOptimizer(model.named_parameters(), spec, stage=2)
        if world == 4:
            model(torch.randn(4, 1024)).square().mean().backward()
            opt.step()
            opt.save_checkpoint(path)
            opt.close()
            return
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS (Linux >= 4.0)
        before = _memory("VmRSS")
        opt.load_checkpoint(path)
        added = _memory("VmHWM") - before
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        mine = torch.tensor(
            [params + opt.state_nbytes() + opt.master_nbytes(), params + added],
            dtype=torch.float64,
        )
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        opt.close()
        if rank == 0:
            results["restore-memory"] = [{"own": float(o), "peak": float(p)} for o, p in every]

    isolated(errors, "restore-memory", one)


CONSOLIDATION_SPECS = {
    "adan": ({"name": "adan", "lr": 0.02, "max_grad_norm": 0.5, "weight_decay": 0.05}, 2),
    "lookahead_adamw": ({"name": "lookahead_adamw", "lr": 0.02}, 1),
    "lamb": ({"name": "lamb", "lr": 0.02}, 1),
}


def consolidation(rank: int, world: int, results: dict[str, Any], errors: dict[str, str]) -> None:
    """Half the steps under ZeRO, then the plain optimizer from consolidated_state_dict."""
    dtype = torch.float64

    def one(name: str, spec: dict[str, Any], stage: int) -> None:
        model = make_model(dtype)
        opt = ZeroOptimizer(model.named_parameters(), spec, stage=stage, bucket_mb=BUCKET_MB)
        zero_steps(model, opt, rank, world, dtype, 0, STEPS // 2)
        consolidated = opt.consolidated_state_dict()
        opt.close()
        if rank != 0:
            assert consolidated is None
            return
        plain_model = make_model(dtype)
        with torch.no_grad():
            for p, q in zip(plain_model.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        plain = create_optimizer(plain_model.named_parameters(), spec)
        plain.load_state_dict(consolidated)
        plain_steps(plain_model, plain, dtype, STEPS // 2, STEPS)
        results[f"consolidated-{name}"] = {
            "max_diff": max_diff(plain_model, reference(spec, dtype))
        }

    for name, (spec, stage) in CONSOLIDATION_SPECS.items():
        isolated(errors, f"consolidated-{name}", lambda a=(name, spec, stage): one(*a))


RESTORE_SPECS = {
    "adan": {"name": "adan", "lr": 0.02, "max_grad_norm": 0.5, "weight_decay": 0.05},
    "lookahead_adamw": {"name": "lookahead_adamw", "lr": 0.02},
    "lamb": {"name": "lamb", "lr": 0.02},
}


def consolidated_restore(
    rank: int, world: int, ckpt_dir: str, results: dict[str, Any], errors: dict[str, str]
) -> None:
    """The portable pair the first world size (4, ZeRO-2) wrote halfway, loaded with
    ``load_consolidated_state_dict`` at every world size and another stage: training goes
    on as if never interrupted."""
    dtype = torch.float64
    stage = {4: 1, 3: 0, 2: 1, 1: 2}[world]

    def one(name: str, spec: dict[str, Any]) -> None:
        path = os.path.join(ckpt_dir, f"portable-{name}.pt")
        if world == 4:
            model = make_model(dtype)
            opt = ZeroOptimizer(model.named_parameters(), spec, stage=2, bucket_mb=BUCKET_MB)
            zero_steps(model, opt, rank, world, dtype, 0, STEPS // 2)
            consolidated = opt.consolidated_state_dict()
            opt.close()
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": consolidated}, path)
            dist.barrier()
        saved = torch.load(path, weights_only=True)
        model = make_model(dtype)
        model.load_state_dict(saved["model"])
        opt = ZeroOptimizer(model.named_parameters(), spec, stage=stage, bucket_mb=BUCKET_MB)
        opt.load_consolidated_state_dict(saved["optimizer"])
        zero_steps(model, opt, rank, world, dtype, STEPS // 2, STEPS)
        opt.close()
        if rank == 0:
            results[f"restore-{name}"] = {"max_diff": max_diff(model, reference(spec, dtype))}

    for name, spec in RESTORE_SPECS.items():
        isolated(errors, f"restore-{name}", lambda a=(name, spec): one(*a))


def misuse(rank: int, world: int, ckpt_dir: str, results: dict[str, Any]) -> None:
    errors: dict[str, str] = {}
    # Different parameter sets on different ranks: every rank raises, none hangs.
    model = make_model(torch.float64)
    named = list(model.named_parameters())
    if rank == 1:
        named = named[:-1]
    try:
        ZeroOptimizer(named, {"name": "adan"}, stage=1)
    except ValueError as e:
        errors["different_params"] = str(e)
    try:
        ZeroOptimizer(model.named_parameters(), {"name": "adagrad"}, stage=1)
    except ValueError as e:
        errors["unknown_optimizer"] = str(e)
    try:
        ZeroOptimizer(model.named_parameters(), {"name": "adan"}, stage=3)
    except ValueError as e:
        errors["bad_stage"] = str(e)
    # Stepping twice without zero_grad() (the reduction overwrote the local sums).
    opt = ZeroOptimizer(model.named_parameters(), {"name": "adan"}, stage=1)
    for _ in range(2):
        model(torch.ones(2, 7, dtype=torch.float64)).sum().backward()
        try:
            opt.step()
        except RuntimeError as e:
            errors["missing_zero_grad"] = str(e)
    # A checkpoint from another model.
    other = torch.nn.Linear(7, 2).double()
    opt = ZeroOptimizer(other.named_parameters(), {"name": "adan"}, stage=1)
    path = os.path.join(ckpt_dir, f"other-world{world}")
    opt.save_checkpoint(path)
    mine = ZeroOptimizer(model.named_parameters(), {"name": "adan"}, stage=1)
    try:
        mine.load_checkpoint(path)
    except ValueError as e:
        errors["other_model_checkpoint"] = str(e)
    results[f"misuse-rank{rank}"] = errors


def worker(rank: int, world: int, init_file: str, out_dir: str, ckpt_dir: str) -> None:
    # A rank that raised inside a collective leaves the others waiting: they time out
    # (gloo raises) instead of hanging the test session.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        equality(rank, world, results, errors)
        overlap(rank, world, results, errors)
        checkpoints(rank, world, ckpt_dir, results, errors)
        consolidated_restore(rank, world, ckpt_dir, results, errors)
        restore_memory(rank, world, ckpt_dir, results, errors)
        if world >= 2:
            consolidation(rank, world, results, errors)
            isolated(errors, f"misuse-rank{rank}", lambda: misuse(rank, world, ckpt_dir, results))
        if world >= 2 and rank == 1:  # rank 1's own view of the misuse errors
            with open(os.path.join(out_dir, f"world{world}-rank1.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
                json.dump(results, f, indent=1)
        if errors:
            with open(os.path.join(out_dir, f"world{world}-errors-rank{rank}.json"), "w") as f:
                json.dump(errors, f, indent=1)
        end_process_group()
