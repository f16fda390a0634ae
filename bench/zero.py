"""ZeRO on 2 ranks (gloo): step time, per-rank peak memory and optimizer-state bytes.

Contenders, each in fresh processes (peak RSS is per process), interleaved round by round:

  DDP + Adan          torch DistributedDataParallel, a full Nestor Adan on every rank
  torch ZeRO + Adan   DDP + torch.distributed.optim.ZeroRedundancyOptimizer around Nestor Adan
  Nestor ZeRO-1       ZeroOptimizer(stage=1), no DDP
  Nestor ZeRO-2       ZeroOptimizer(stage=2), no DDP
  ... overlapped      the same with overlap_with(model): the parameter all-gather after a
                      step runs on while the next forward pass starts

A step is timed as the loop's wall time over all measured steps divided by their number
(no barrier between steps, which would wait for an all-gather still in flight).

The model is a 21M-parameter MLP (five 2048x2048 layers); a step is forward, backward and
optimizer step on 64 samples per rank. Figures are medians over rounds.

    python bench/zero.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from optimizers import Adan, ZeroOptimizer  # noqa: E402

WIDTH, LAYERS, BATCH = 2048, 5, 64
SPEC = {"name": "adan", "lr": 1e-3, "weight_decay": 0.02, "no_decay_1d": False}
CONTENDERS = [
    "DDP + Adan",
    "torch ZeRO + Adan",
    "Nestor ZeRO-1",
    "Nestor ZeRO-1 overlapped",
    "Nestor ZeRO-2",
    "Nestor ZeRO-2 overlapped",
]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.nbytes
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )


def worker(rank: int, contender: str, steps: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model = make_model()
    kw = dict(lr=SPEC["lr"], weight_decay=SPEC["weight_decay"])
    if contender == "DDP + Adan":
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = Adan(net.parameters(), **kw)
        nbytes = lambda: state_bytes(opt)  # noqa: E731
    elif contender == "torch ZeRO + Adan":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=Adan, **kw)
        nbytes = lambda: state_bytes(opt.optim)  # noqa: E731
    else:
        net = model
        stage = 1 if "ZeRO-1" in contender else 2
        opt = ZeroOptimizer(model.named_parameters(), SPEC, stage=stage)
        if contender.endswith("overlapped"):
            opt.overlap_with(model)
        nbytes = opt.state_nbytes
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, WIDTH, generator=gen)

    def train(n: int) -> None:
        for _ in range(n):
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(2)  # warm-up: state creation, kernel compile
    dist.barrier()
    start = time.perf_counter()
    train(steps)
    net(x[:1])  # the last all-gather, overlapped with a forward as in training
    step_s = (time.perf_counter() - start) / steps
    peak = torch.tensor(
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, nbytes()], dtype=torch.int64
    )
    peaks = [torch.zeros_like(peak) for _ in range(2)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "step_s": step_s,
                    "peak_rss": max(int(p[0]) for p in peaks),
                    "state_bytes": max(int(p[1]) for p in peaks),
                },
                f,
            )
    dist.barrier()
    # Exit without tearing down: torch 2.13's DDP Reducer can deadlock in its destructor
    # after destroy_process_group (seen here), and a benchmark must not hang.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    numel = sum(p.numel() for p in make_model().parameters())
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, contender in enumerate(CONTENDERS):
                init, out = os.path.join(tmp, f"init{r}-{i}"), os.path.join(tmp, f"out{r}-{i}")
                mp.spawn(worker, args=(contender, args.steps, init, out), nprocs=2, join=True)
                with open(out) as f:
                    results[contender].append(json.load(f))
    print(
        f"{numel / 1e6:.1f}M fp32 parameters, 2 ranks (gloo, 1 thread each), Adan, "
        f"batch {BATCH}/rank, median of {args.rounds} rounds of {args.steps} steps"
    )
    unsharded = 16 * numel
    ddp = statistics.median(r["step_s"] for r in results["DDP + Adan"])
    print(
        f"| {'contender':<24} | {'step ms':>8} | {'vs DDP':>6} | {'peak RSS/rank':>13} "
        f"| {'opt. state/rank':>15} | {'of unsharded':>12} |"
    )
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|{'-' * 15}|{'-' * 17}|{'-' * 14}|")
    for contender, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        rss = statistics.median(r["peak_rss"] for r in runs)
        state = statistics.median(r["state_bytes"] for r in runs)
        print(
            f"| {contender:<24} | {step * 1e3:>8.0f} | {step / ddp:>5.2f}x | "
            f"{rss / 2**20:>10.0f} MiB | {state / 2**20:>11.1f} MiB | "
            f"{state / unsharded:>11.1%} |"
        )


if __name__ == "__main__":
    main()
