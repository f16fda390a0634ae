"""Training throughput of 2 workers against the ceiling of this machine, by ZeRO stage and
micro-batch, with where the difference goes.

Three ways to train the same model on the same batches with the same optimizer (the spec's,
from ``optimizers``), side by side in one run:

- **ceiling**: one plain PyTorch process per core (2 here), no Ray and no collectives: each
  indexes a random micro-batch out of the in-memory tensors, runs forward and backward and
  steps its own full optimizer. The sum of their samples/s is what 2 cores can train.
- **DDP (peer)**: the same 2 processes joined by a gloo group with torch's
  ``DistributedDataParallel`` (bucketed gradient all-reduce overlapped with backward).
- **Nestor**: `nestor train` (its own Ray, 2 workers) at ZeRO stages 0, 1 and 2.

Each plain process times its phases (indexing, forward + backward, the optimizer step);
Nestor's samples/s is its wall rate between the records of step 6 and the last but one
(reporting and the data loader included); its loop's own step timer is shown beside it.
Global batch = micro-batch x 2 workers (no accumulation), so every step pays one optimizer
step and one round of collectives per micro-batch.

    python bench/throughput.py [--rounds 2] [--micro 512 4096] [--steps 40] [--spec SPEC.json]
                               [--before TREE]

--before TREE also runs `nestor train` from another checkout (git worktree add TREE REV) at
each stage, in the same rounds, for before/after figures from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder heads sys.path and bench/optimizers.py would shadow the package
# (in the spawned processes too, which import this module).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
SKIP = 5  # steps not counted: allocation, the fused kernel's first call


def nestor_train(spec: dict, out: Path, tree: Path = ROOT) -> dict[str, float]:
    """`nestor train` of checkout ``tree`` on its own Ray: median samples/s and step time
    after the first steps (PYTHONPATH too, so that Ray's workers import that checkout)."""
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(spec_path), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tree,
        env=dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(tree)),
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[SKIP:-1]  # the last step's record waits for the final evaluation
    wall = (steady[-1]["time"] - steady[0]["time"]) / (len(steady) - 1)
    return {
        "samples_per_s": spec["batch_size"] / wall,  # everything between two steps' records
        "step_s": wall,
        "loop_step_s": statistics.median(r["step_time"] for r in steady),  # the loop's timer
        # The loop's own parts: reading data (its DataLoader), forward + backward (with the
        # loss's all-reduce; at stage 2 the gradient reduce-scatter), the optimizer step
        # (with its collectives).
        "index": statistics.median(r.get("data_time", math.nan) for r in steady),
        "forward_backward": statistics.median(r.get("compute_time", math.nan) for r in steady),
        "optimizer": statistics.median(r.get("optimizer_time", math.nan) for r in steady),
    }


def _plain(rank: int, world: int, spec_json: str, steps: int, ddp: bool, out: str) -> None:
    """One plain process: train ``steps`` micro-batches, time each phase, write the medians."""
    import torch
    import torch.distributed as dist

    from optimizers import create_optimizer
    from optimizers.zero.collectives import end_process_group
    from workers.data import Objective, build_model, load_data
    from workers.spec import TrainSpec

    torch.set_num_threads(1)
    spec = TrainSpec.model_validate_json(spec_json)
    data = load_data(spec)
    train = data.train  # an ArrayDataset: rows [start, stop) of two in-memory arrays
    x_all, y_all = (
        torch.as_tensor(a)[train.start : train.stop] for a in (train.inputs, train.targets)
    )
    model = build_model(spec, data)
    objective = Objective(spec, data)
    if ddp:
        init = f"file://{out}.init"
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = create_optimizer(model.parameters(), spec.optimizer_spec())
    gen = torch.Generator().manual_seed(rank)
    phases: dict[str, list[float]] = {"index": [], "forward_backward": [], "optimizer": []}
    steps_s = []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(len(x_all), (spec.micro_batch_size,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        t1 = time.perf_counter()
        objective(model(x), y).backward()  # with DDP: the all-reduce too
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[key].append(dt)
        steps_s.append(t3 - t0)
    if ddp:
        end_process_group()
    med = {k: statistics.median(v[SKIP:]) for k, v in phases.items()}
    step = statistics.median(steps_s[SKIP:])
    result = {**med, "step_s": step, "samples_per_s": spec.micro_batch_size / step}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))


def plain(spec: dict, steps: int, ddp: bool, tmp: Path) -> dict[str, float]:
    """2 plain processes at once; samples/s summed, phases averaged over the two."""
    import torch.multiprocessing as mp

    out = tmp / f"plain-{'ddp' if ddp else 'alone'}-{spec['micro_batch_size']}"
    mp.spawn(_plain, args=(2, json.dumps(spec), steps, ddp, str(out)), nprocs=2)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    summary = {k: statistics.mean(r[k] for r in ranks) for k in ranks[0]}
    summary["samples_per_s"] = sum(r["samples_per_s"] for r in ranks)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--rounds", type=int, default=2, help="all contenders, interleaved")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "mnist1d-adan-32k.json"))
    parser.add_argument(
        "--before", metavar="TREE", help="also run Nestor from this checkout, in the same rounds"
    )
    args = parser.parse_args()
    before = Path(args.before).resolve() if args.before else None
    base = json.loads(Path(args.spec).read_text())
    base.update(max_steps=args.steps, checkpoint_every=0, eval_every=args.steps, num_workers=2)
    base.update(log_every=1)
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for micro in args.micro:
                spec = {**base, "micro_batch_size": micro, "batch_size": 2 * micro}
                work = Path(tmp) / f"r{r}"
                work.mkdir(exist_ok=True)
                runs.setdefault((micro, "ceiling"), []).append(plain(spec, args.steps, False, work))
                runs.setdefault((micro, "ddp"), []).append(plain(spec, args.steps, True, work))
                for s in (0, 1, 2):
                    out = nestor_train({**spec, "zero_stage": s}, work / f"m{micro}-s{s}")
                    runs.setdefault((micro, f"zero{s}"), []).append(out)
                    if before is not None:
                        old = work / f"m{micro}-s{s}-before"
                        out = nestor_train({**spec, "zero_stage": s}, old, before)
                        runs.setdefault((micro, f"before{s}"), []).append(out)

    def median(key: tuple[int, str]) -> dict[str, float]:
        return {k: statistics.median(x[k] for x in runs[key]) for k in runs[key][0]}

    rows = [
        (
            micro,
            median((micro, "ceiling")),
            median((micro, "ddp")),
            {s: median((micro, f"zero{s}")) for s in (0, 1, 2)},
        )
        for micro in args.micro
    ]
    print(
        f"{base['model']} on {base['dataset']['name']} ({base['dataset'].get('num_samples')} "
        f"samples), {base['optimizer']['name']}, 2 workers, global batch = 2 x micro-batch, "
        f"{args.steps} steps (first {SKIP} not counted), {os.cpu_count()} CPUs, median of "
        f"{args.rounds} interleaved round(s)"
    )
    print()
    print(
        "| micro-batch | ceiling samples/s | DDP (peer) | Nestor ZeRO-0 | ZeRO-1 | ZeRO-2 | "
        "Nestor / ceiling (0 / 1 / 2) |"
    )
    print("|---|---|---|---|---|---|---|")
    for micro, ceiling, ddp, stages in rows:
        c = ceiling["samples_per_s"]
        fractions = " / ".join(f"{stages[s]['samples_per_s'] / c:.0%}" for s in (0, 1, 2))
        print(
            f"| {micro} | {c:,.0f} | {ddp['samples_per_s']:,.0f} ({ddp['samples_per_s'] / c:.0%}) "
            f"| {stages[0]['samples_per_s']:,.0f} | {stages[1]['samples_per_s']:,.0f} | "
            f"{stages[2]['samples_per_s']:,.0f} | {fractions} |"
        )
    if before is not None:
        print()
        print(f"Before ({before}), the same rounds, Nestor / ceiling (0 / 1 / 2):")
        print()
        print("| micro-batch | ZeRO-0 | ZeRO-1 | ZeRO-2 | Nestor / ceiling (0 / 1 / 2) |")
        print("|---|---|---|---|---|")
        for micro, ceiling, _, _ in rows:
            c = ceiling["samples_per_s"]
            old = [median((micro, f"before{s}"))["samples_per_s"] for s in (0, 1, 2)]
            print(
                f"| {micro} | {old[0]:,.0f} | {old[1]:,.0f} | {old[2]:,.0f} | "
                + " / ".join(f"{x / c:.0%}" for x in old)
                + " |"
            )
    print()
    print(
        "Where a step's time goes, ms per step (rank 0's medians; Nestor's from its reported "
        "data_time, compute_time, optimizer_time; reporting = wall between records - loop's "
        "step):"
    )
    print()
    print(
        "| micro-batch | | data | forward + backward (+ collectives) | optimizer "
        "(+ collectives) | reporting | whole step |"
    )
    print("|---|---|---|---|---|---|---|")
    for micro, ceiling, ddp, stages in rows:
        labelled = [("ceiling", ceiling), ("DDP (peer)", ddp)]
        labelled += [(f"Nestor ZeRO-{s}", stages[s]) for s in (0, 1, 2)]
        for label, r in labelled:
            reporting = r["step_s"] - r.get("loop_step_s", r["step_s"])
            print(
                f"| {micro} | {label} | {r['index'] * 1e3:.1f} | "
                f"{r['forward_backward'] * 1e3:.1f} | {r['optimizer'] * 1e3:.1f} | "
                f"{reporting * 1e3:.1f} | {r['step_s'] * 1e3:.1f} |"
            )


if __name__ == "__main__":
    main()
