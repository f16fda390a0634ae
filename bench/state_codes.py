"""Which int8 code for which optimizer state: the error of each candidate on real state.

Trains the byte-level transformer (workers.models.CharTransformer on the standard library's
sources) with fp32 Adan for ``--steps`` steps, takes its state, and quantizes each buffer
block-wise (256 elements, an fp32 absmax each) with each candidate code, rounding to nearest
and stochastically. Printed per buffer and code:

  rel err     ||dequantized - fp32|| / ||fp32|| over the quantized tensors
  zeroed      fraction of nonzero elements that come back as 0
  update err  ||u_q - u|| / ||u||, u = Adan's update m/(sqrt(n)+eps) + beta2 v/(...), with only
              this buffer quantized (the others fp32): what the error costs the step itself

Codes: ``power p`` stands for value = sign(c) (|c|/max)^p * absmax (p=1 is linear int8).
Signed buffers use int8 (127 levels a side), the non-negative second moment uint8 (255).

    python bench/state_codes.py [--steps 200] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from optimizers import Adan, lowbit  # noqa: E402
from workers.datasets import pystdlib_chars  # noqa: E402
from workers.models import char_transformer  # noqa: E402

SIGNED = ("exp_avg", "exp_avg_diff", "neg_pre_grad")
CANDIDATES = {True: (1, 2, 3, 4), False: (1, 2, 4, 6, 8)}  # signed -> powers tried


def train(steps: int, batch: int) -> tuple[Adan, list[torch.Tensor]]:
    torch.manual_seed(0)
    data = pystdlib_chars(num_samples=20_000)
    model = char_transformer(data)
    train_set = data.train  # an ArrayDataset: rows [start, stop) of inputs, targets
    rows = slice(train_set.start, train_set.stop)
    x = torch.as_tensor(train_set.inputs[rows])
    y = torch.as_tensor(train_set.targets[rows])
    opt = Adan(model.parameters(), lr=3e-3, weight_decay=0.02, fused=False)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        logits = model(x[idx])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}", file=sys.stderr)
    big = [p for p in model.parameters() if p.numel() >= lowbit.MIN_QUANT_NUMEL]
    return opt, big


def update(m: torch.Tensor, v: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (m + 0.92 * v) / (n.sqrt() + 1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    opt, params = train(args.steps, args.batch)
    states = [opt.state[p] for p in params]
    step = int(states[0]["step"])
    print(
        f"state of {len(params)} tensors ({sum(p.numel() for p in params):,} elements) "
        f"after {step} steps of fp32 Adan on the char transformer\n"
    )
    print("| buffer | code | rounding | rel err | zeroed | update err |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for key in (*SIGNED, "exp_avg_sq"):
        signed = key != "exp_avg_sq"
        for power in CANDIDATES[signed]:
            for stochastic in (False, True):
                err2 = ref2 = zeroed = nonzero = uerr2 = uref2 = 0.0
                for s in states:
                    x = s[key]
                    codes, absmax = lowbit.quantize(
                        x, step, signed=signed, power=power, stochastic=stochastic
                    )
                    q = lowbit.dequantize(codes, absmax, power=power)
                    err2 += float((q - x).pow(2).sum())
                    ref2 += float(x.pow(2).sum())
                    zeroed += float(((q == 0) & (x != 0)).sum())
                    nonzero += float((x != 0).sum())
                    m, v, n = s["exp_avg"], s["exp_avg_diff"], s["exp_avg_sq"]
                    u = update(m, v, n)
                    parts = {"exp_avg": m, "exp_avg_diff": v, "exp_avg_sq": n}
                    if key in parts:
                        parts[key] = q
                        uq = update(parts["exp_avg"], parts["exp_avg_diff"], parts["exp_avg_sq"])
                        uerr2 += float((uq - u).pow(2).sum())
                        uref2 += float(u.pow(2).sum())
                uerr = f"{(uerr2 / uref2) ** 0.5:.4f}" if uref2 else "-"
                print(
                    f"| {key} | {'int8' if signed else 'uint8'} power {power} "
                    f"| {'stochastic' if stochastic else 'nearest'} "
                    f"| {(err2 / ref2) ** 0.5:.4f} | {zeroed / max(nonzero, 1):.4f} | {uerr} |"
                )


if __name__ == "__main__":
    main()
