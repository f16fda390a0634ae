"""Training step time in fp32 and bf16 for Nestor's built-in models, and where it goes.

Why can a bf16 step be slower than an fp32 one? On the small 1-D CNN (mnist1d-cnn, 9k
parameters, batch 32k) the work is a few tiny convolutions and elementwise ops over large
activations, so the step is memory- and launch-bound, not FLOP-bound: bf16 can only win by
moving fewer bytes, and autocast adds a cast kernel per input and weight. The suspects,
each a row here, interleaved round by round:

  fp32                  the baseline (TF32 convolutions and matmuls, torch's defaults)
  bf16                  autocast, cuDNN picking algorithms by heuristics (torch's default)
  bf16, cudnn.benchmark autocast, cuDNN timing its algorithms for these shapes first
  fp32, cudnn.benchmark the same for fp32

and for each the top kernels of one step from torch.profiler, so a run says which kernels
the time is in (convolution algorithms, layout transposes, casts). The training loop leaves
``cudnn.benchmark`` off: timing algorithms picks them by a race, so two runs of one job could
differ in their last bits, and Nestor's runs are reproducible to the bit.

Synthetic inputs of the data sets' shapes: nothing to download, no mnist1d needed.

    python bench/precision.py [--device cuda] [--model mnist1d-cnn|char-transformer]
                              [--batch 32768] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from workers.models import CharTransformer, Mnist1dCNN  # noqa: E402


def problem(name: str, batch: int, device: torch.device):
    """The model and one batch of inputs and targets of its data set's shape."""
    gen = torch.Generator().manual_seed(0)
    if name == "mnist1d-cnn":
        model = Mnist1dCNN(40, 32, 10)
        x, y = torch.randn(batch, 40, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    else:  # a 25M-parameter char-transformer: d 512, 8 layers, 128 tokens
        model = CharTransformer(256, 128, d=512, layers=8, heads=8)
        x = torch.randint(0, 256, (batch, 128), generator=gen)
        y = torch.randint(0, 256, (batch, 128), generator=gen)
    return model.to(device), x.to(device), y.to(device)


def stepper(name: str, batch: int, device: torch.device, bf16: bool, benchmark: bool):
    model, x, y = problem(name, batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")

    def step() -> None:
        torch.backends.cudnn.benchmark = benchmark
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        with autocast:
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.flatten(0, -2).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm up (and let cudnn.benchmark choose)
        step()
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def top_kernels(step, device: torch.device, count: int = 6) -> list[tuple[str, float]]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [(e.key, getattr(e, attr) / 1e3) for e in events[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default="mnist1d-cnn", choices=["mnist1d-cnn", "char-transformer"]
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    batch = args.batch or (32768 if args.model == "mnist1d-cnn" else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, batch {batch}, {name}, torch {torch.__version__}")

    configs = {
        "fp32": (False, False),
        "bf16": (True, False),
        "bf16, cudnn.benchmark": (True, True),
        "fp32, cudnn.benchmark": (False, True),
    }
    steps = {k: stepper(args.model, batch, device, *v) for k, v in configs.items()}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for k, step in steps.items():
            times[k].append(timed(step, args.steps, device))
    base = statistics.median(times["fp32"])
    print(f"\n{'':24} {'ms/step':>9} {'vs fp32':>8}")
    for k, ts in times.items():
        t = statistics.median(ts)
        print(f"{k:24} {t * 1e3:9.2f} {t / base:7.2f}x")
    for k, step in steps.items():
        print(f"\ntop kernels, {k} (ms in one step):")
        for key, ms in top_kernels(step, device):
            print(f"  {ms:8.3f}  {key[:90]}")


if __name__ == "__main__":
    main()
