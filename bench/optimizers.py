"""Optimizer step time and effective bandwidth, Nestor's Adan paths beside named peers.

Contenders, interleaved round by round (A B C ... A B C ...) because this machine's memory
bandwidth drifts by several times within an hour; each figure is the median over rounds:

  torch AdamW fused   torch.optim.AdamW(fused=True): the bar to reach (28 bytes/param)
  Nestor Adan fused   compiled kernels (44 bytes/param)
  Nestor fused, new grads  the same, given new gradient tensors every step (as after
                      zero_grad() and backward): they are copied into its flat gradient
                      buffer first, 8 more bytes/param moved (not counted in its GB/s)
  Nestor Adan foreach torch._foreach_* path
  Nestor Adan single  the readable reference path
  p-o Adan foreach    pytorch-optimizer's Adan (foreach=True), the common third-party Adan

Roofline: an in-place triad (a += s*b: reads a and b, writes a, 12 bytes/element) measured
in the same rounds. It is in place like the optimizers, so neither pays write-allocate traffic
that the byte counts leave out.
The fused path's first-step (compile) time is measured in fresh subprocesses, with an empty
and with a warm inductor cache.

    python bench/optimizers.py [--numel 16777216] [--rounds 7] [--steps 5] [--before TREE]

--before TREE adds the fused Adan of another checkout (git worktree add TREE REV) to the
same rounds, for before/after figures from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

# Run as a script, this file's folder heads sys.path and its name would shadow the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from optimizers import Adan  # noqa: E402

BYTES_PER_PARAM = {"adamw": 28, "adan": 44}


def make_problem(numel: int, tensors: int, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    size = numel // tensors
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(size, generator=gen))
        p.grad = torch.randn(size, generator=gen) * 1e-2
        params.append(p)
    return params


def load_before(tree: str) -> type[torch.optim.Optimizer]:
    """Adan from another checkout's ``optimizers`` package, imported under another name so
    both builds step in one process, interleaved."""
    import importlib.util

    folder = os.path.join(tree, "optimizers")
    spec = importlib.util.spec_from_file_location(
        "optimizers_before",
        os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["optimizers_before"] = module
    spec.loader.exec_module(module)
    return module.Adan


def contenders(
    numel: int, tensors: int, before: type[torch.optim.Optimizer] | None = None
) -> dict[str, tuple[str, Callable[[], None]]]:
    from pytorch_optimizer import Adan as PoAdan

    def stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
        opt.step()  # create state (and compile) outside the timed region
        return opt.step

    def fresh_grads(opt: torch.optim.Optimizer) -> Callable[[], None]:
        """Each step sees gradient tensors it has not seen, as after zero_grad() and a new
        backward (two sets, alternated: the tensors are made outside the timed region)."""
        params = opt.param_groups[0]["params"]
        sets = [[p.grad.clone() for p in params] for _ in range(2)]
        opt.step()
        turn = [0]

        def step() -> None:
            turn[0] ^= 1
            for p, g in zip(params, sets[turn[0]], strict=True):
                p.grad = g
            opt.step()

        return step

    def triad() -> Callable[[], None]:
        a, b = torch.randn(numel), torch.randn(numel)
        return lambda: a.add_(b, alpha=1e-9)

    kw = dict(lr=1e-3, weight_decay=0.02)
    previous = {}
    if before is not None:
        opt = before(make_problem(numel, tensors, 6), fused=True, **kw)
        previous["Adan fused (--before)"] = ("adan", stepper(opt))
    return {
        "triad (roofline)": ("triad", triad()),
        "torch AdamW fused": (
            "adamw",
            stepper(torch.optim.AdamW(make_problem(numel, tensors, 0), fused=True, **kw)),
        ),
        "Nestor Adan fused": (
            "adan",
            stepper(Adan(make_problem(numel, tensors, 1), fused=True, **kw)),
        ),
        **previous,
        "Nestor fused, new grads": (
            "adan",
            fresh_grads(Adan(make_problem(numel, tensors, 5), fused=True, **kw)),
        ),
        "Nestor Adan foreach": (
            "adan",
            stepper(Adan(make_problem(numel, tensors, 2), foreach=True, fused=False, **kw)),
        ),
        "Nestor Adan single": (
            "adan",
            stepper(Adan(make_problem(numel, tensors, 3), foreach=False, fused=False, **kw)),
        ),
        "p-o Adan foreach": (
            "adan",
            stepper(PoAdan(make_problem(numel, tensors, 4), foreach=True, **kw)),
        ),
    }


def measure(
    numel: int, tensors: int, rounds: int, steps: int, before: type | None = None
) -> list[dict]:
    runners = contenders(numel, tensors, before)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (_, fn) in runners.items():
            n = steps * 4 if name.startswith("triad") else steps
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    triad_s = statistics.median(times["triad (roofline)"])
    triad_gbs = 12 * numel / triad_s / 1e9
    adamw_s = statistics.median(times["torch AdamW fused"])
    rows = []
    for name, (kind, _) in runners.items():
        t = statistics.median(times[name])
        if kind == "triad":
            rows.append(dict(name=name, ms=t * 1e3, gbs=triad_gbs, vs_adamw="", roof=1.0))
            continue
        gbs = BYTES_PER_PARAM[kind] * numel / t / 1e9
        rows.append(
            dict(
                name=name, ms=t * 1e3, gbs=gbs, vs_adamw=f"{t / adamw_s:.2f}x", roof=gbs / triad_gbs
            )
        )
    return rows


_FIRST_STEP = """
import time, torch
from optimizers import Adan
params = [torch.nn.Parameter(torch.randn({size})) for _ in range({tensors})]
for p in params:
    p.grad = torch.randn_like(p)
opt = Adan(params, fused=True)
start = time.perf_counter()
opt.step()
print(time.perf_counter() - start)
"""


def first_step_seconds(numel: int, tensors: int) -> tuple[float, float]:
    """(cold, warm): a fresh process with an empty inductor cache, then the same again."""
    code = _FIRST_STEP.format(size=numel // tensors, tensors=tensors)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = []
        for _ in range(2):
            res = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            out.append(float(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--before", metavar="TREE", help="also step the fused Adan of this checkout"
    )
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.numel / 2**20:.0f}M fp32 parameters, median of {args.rounds} interleaved "
        f"rounds of {args.steps} steps"
    )
    for tensors in (1, 200):
        rows = measure(args.numel, tensors, args.rounds, args.steps, before)
        print(f"\n{args.numel / 2**20:.0f}M parameters as {tensors} tensor(s)")
        print(
            f"| {'contender':<24} | {'step ms':>8} | {'GB/s':>6} | {'vs AdamW fused':>14} "
            f"| {'of triad':>8} |"
        )
        print(f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|{'-' * 16}|{'-' * 10}|")
        for r in rows:
            print(
                f"| {r['name']:<24} | {r['ms']:>8.2f} | {r['gbs']:>6.1f} | "
                f"{r['vs_adamw']:>14} | {r['roof']:>7.0%} |"
            )
        fused = next(r for r in rows if r["name"] == "Nestor Adan fused")["ms"]
        po = next(r for r in rows if r["name"] == "p-o Adan foreach")["ms"]
        print(f"Nestor fused vs pytorch-optimizer: {po / fused:.1f}x faster per step")
    cold, warm = first_step_seconds(args.numel, 200)
    print(
        f"\nfirst fused step (compile), 200 tensors: {cold:.1f} s with an empty inductor "
        f"cache, {warm:.1f} s with a warm one"
    )


if __name__ == "__main__":
    main()
