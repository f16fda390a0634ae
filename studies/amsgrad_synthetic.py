"""The AMSGrad paper's synthetic problem (Reddi, Kale & Kumar, ICLR 2018, Section 5), run with
Nestor's own Adam (AdamW with no decay) and AMSGrad.

Online linear losses on the interval [-1, 1]:

    f_t(x) = 1010 x   when t mod 101 == 1
    f_t(x) = -10 x    otherwise

Over every 101 steps the sum is 1010 x - 1000 x = 10 x, so the best fixed point is x = -1.
The large gradient comes once in 101 steps; Adam's second moment forgets it (beta2 = 0.99),
so the many small gradients pull x to +1, the worst point. AMSGrad keeps the maximum of the
second moment and converges to -1. As in the paper: beta1 = 0.9, beta2 = 0.99, step size
alpha / sqrt(t) (alpha = 0.5 here; the paper grid-searched it), x projected back onto [-1, 1]
after every step, x_0 = 0.

    python -m studies.amsgrad_synthetic [--steps 200000] [--out docs/large-batch/amsgrad.png]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from optimizers import AdamW


def gradient(t: int) -> float:
    """df_t/dx for t = 1, 2, ..."""
    return 1010.0 if t % 101 == 1 else -10.0


def run(amsgrad: bool, steps: int, alpha: float = 0.5, record_every: int = 100) -> np.ndarray:
    """x after every ``record_every`` steps, starting from x = 0."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = AdamW([x], lr=alpha, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=amsgrad)
    trace = []
    for t in range(1, steps + 1):
        x.grad = torch.full_like(x, gradient(t))
        for group in opt.param_groups:
            group["lr"] = alpha / math.sqrt(t)
        opt.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # projection onto the feasible set
        if t % record_every == 0:
            trace.append(x.item())
    return np.asarray(trace)


def plot(adam: np.ndarray, amsgrad: np.ndarray, record_every: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(adam) + 1) * record_every
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.plot(steps, adam, label="Adam (Nestor AdamW, amsgrad=False)", color="#1f77b4")
    ax.plot(steps, amsgrad, label="AMSGrad (Nestor AdamW, amsgrad=True)", color="#d62728")
    ax.axhline(-1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlabel("step t")
    ax.set_ylabel("x_t")
    ax.set_title("f_t(x) = 1010x if t mod 101 = 1 else -10x on [-1, 1]; optimum x = -1")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument("--out", default="docs/large-batch/amsgrad.png")
    args = parser.parse_args()
    adam = run(False, args.steps, record_every=args.record_every)
    ams = run(True, args.steps, record_every=args.record_every)
    print(f"after {args.steps:,} steps: Adam x = {adam[-1]:+.4f}, AMSGrad x = {ams[-1]:+.4f}")
    print(
        f"average regret per step vs x=-1 over the run's last 101-step period: "
        f"Adam {10 * (adam[-1] + 1) / 101:.4f}, AMSGrad {10 * (ams[-1] + 1) / 101:.4f}"
    )
    plot(adam, ams, args.record_every, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
