"""What each rank runs in test_zero.py: ZeroOptimizer (Adan, compiled kernels) at stages 1
and 2, one GPU per rank over NCCL (the CPU and gloo in the dry run), against the readable
Adan training the same model on the whole batch in one process; and a checkpoint round
trip. Rank 0 writes ``out_dir/results.json``.

Each rank takes its own part of every global batch in ``ACCUMULATION`` micro-batches.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from optimizers import Adan, ZeroOptimizer, param_groups_weight_decay
from optimizers.zero.collectives import end_process_group

STEPS = 8
MICRO, ACCUMULATION = 8, 2
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.02, 0.05, 0.2
SPEC = {
    "name": "adan",
    "lr": LR,
    "weight_decay": WEIGHT_DECAY,
    "max_grad_norm": MAX_GRAD_NORM,
    "fused": True,
}
BUCKET_MB = 3000 * 4 / 2**20  # ~3,000 fp32 elements: several buckets, parameters cut

# (name, stage, parameter dtype)
SCENARIOS = [
    ("stage1-fp32", 1, torch.float32),
    ("stage2-fp32", 2, torch.float32),
    ("stage2-bf16", 2, torch.bfloat16),
]


def make_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128),
        torch.nn.GELU(),
        torch.nn.LayerNorm(128),
        torch.nn.Linear(128, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 10),
    )
    return model.to(device, dtype)


def batch(step: int, world: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    n = world * ACCUMULATION * MICRO
    x = torch.randn(n, 32, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def zero_steps(model, opt, rank, world, device, dtype, first: int, last: int) -> None:
    for step in range(first, last):
        x, y = batch(step, world, device, dtype)
        opt.zero_grad()
        for j in range(ACCUMULATION):
            lo = (rank * ACCUMULATION + j) * MICRO
            loss = F.mse_loss(model(x[lo : lo + MICRO]), y[lo : lo + MICRO]) / ACCUMULATION
            loss.backward()
        opt.step()


def reference(world: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The readable Adan (single-tensor path) on the whole batch in one process; bf16
    parameters the textbook way, from fp32 master copies rounded after every step."""
    model = make_model(device, dtype)
    params = list(model.parameters())
    masters = (
        params if dtype == torch.float32 else [p.detach().float().requires_grad_() for p in params]
    )
    opt = Adan(
        param_groups_weight_decay(masters, WEIGHT_DECAY),  # as ZeroOptimizer groups them
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        foreach=False,
        fused=False,
    )
    for step in range(STEPS):
        x, y = batch(step, world, device, dtype)
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        for p, m in zip(params, masters, strict=True):
            if m is not p:
                m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masters, strict=True):
                if m is not p:
                    p.copy_(m)
    return [p.detach().clone() for p in params]


def diffs(model: torch.nn.Module, expected: list[torch.Tensor]) -> dict[str, float]:
    d = torch.cat(
        [
            (p.detach().double() - e.double()).abs().reshape(-1)
            for p, e in zip(model.parameters(), expected, strict=True)
        ]
    )
    return {"max_diff": d.max().item(), "mean_diff": d.mean().item()}


def worker(
    rank: int, world: int, device_type: str, backend: str, init_file: str, out_dir: str
) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    results: dict[str, Any] = {}
    try:
        for name, stage, dtype in SCENARIOS:
            model = make_model(device, dtype)
            opt = ZeroOptimizer(model.named_parameters(), SPEC, stage=stage, bucket_mb=BUCKET_MB)
            zero_steps(model, opt, rank, world, device, dtype, 0, STEPS)
            opt.close()
            if rank == 0:
                results[name] = {
                    **diffs(model, reference(world, device, dtype)),
                    "grad_norm": float(opt.last_grad_norm),
                    "devices": sorted({str(p.device) for p in model.parameters()}),
                    "buckets": len(opt.shard_view.layout.buckets),
                }

        # Checkpoint halfway, finish; a fresh model and optimizer load it and finish too.
        path = os.path.join(out_dir, "checkpoint")
        runs = []
        for resume in (False, True):
            model = make_model(device, torch.float32)
            opt = ZeroOptimizer(model.named_parameters(), SPEC, stage=2, bucket_mb=BUCKET_MB)
            if resume:
                opt.load_checkpoint(path)
            else:
                zero_steps(model, opt, rank, world, device, torch.float32, 0, STEPS // 2)
                opt.save_checkpoint(path)
            zero_steps(model, opt, rank, world, device, torch.float32, STEPS // 2, STEPS)
            opt.close()
            runs.append(model)
        if rank == 0:
            uninterrupted = [p.detach() for p in runs[0].parameters()]
            results["checkpoint"] = {
                "resumed_vs_uninterrupted": diffs(runs[1], uninterrupted)["max_diff"],
                **diffs(runs[1], reference(world, device, torch.float32)),
            }
    finally:
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
        end_process_group()
