"""Optimizer state per rank in a real job: precision and ZeRO sharding, multiplied.

Runs the byte-level transformer (char-transformer, d=256, 4 layers: 3.2M parameters) as a
job in local processes (``workers.launcher.run_local``, the loop every job runs) for a few
steps, for each state precision at one worker and at two workers with ZeRO-2, and prints
what each job reported: ``opt_state_bytes`` (this rank's state, measured from its tensors)
and ``opt_state_bytes_per_param``. The ratio column is against fp32 Adan on one worker.

    python bench/state_memory.py [--optimizer adan] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from workers import TrainSpec  # noqa: E402
from workers.launcher import run_local  # noqa: E402


def job(optimizer: str, precision: str, workers: int, steps: int) -> dict[str, float]:
    spec = TrainSpec.model_validate(
        {
            "model": {
                "factory": "workers.models:char_transformer",
                "kwargs": {"d": 256, "layers": 4, "heads": 4},
            },
            "dataset": {"name": "pystdlib-chars", "num_samples": 4000},
            "optimizer": {"name": optimizer, "lr": 1e-3, "state_precision": precision},
            "batch_size": 64,
            "micro_batch_size": 32,
            "num_workers": workers,
            "zero_stage": 2 if workers > 1 else 0,
            "max_steps": steps,
            "log_every": 1,
            "eval_every": 1000,
            "checkpoint_every": 0,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = run_local(spec, Path(tmp) / "run")
        if result["status"] != "succeeded":
            raise RuntimeError(f"{precision} x{workers}: {result.get('error')}")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="adan")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for precision in ("fp32", "bf16", "int8"):
        for workers in (1, 2):
            m = job(args.optimizer, precision, workers, args.steps)
            rows.append((precision, workers, m["opt_state_bytes"], m["opt_state_bytes_per_param"]))
    base = rows[0][2]
    print(f"{args.optimizer}, char-transformer d=256 x4 layers; state of one rank, as reported\n")
    print("| state | workers (ZeRO) | state bytes / rank | bytes / param held | vs fp32 x1 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for precision, workers, nbytes, per_param in rows:
        zero = "1" if workers == 1 else f"{workers} (ZeRO-2)"
        print(
            f"| {precision} | {zero} | {nbytes / 2**20:.2f} MiB | {per_param:.2f} "
            f"| {nbytes / base:.3f} |"
        )


if __name__ == "__main__":
    main()
