"""Training throughput on 2 workers for ZeRO stages 0, 1 and 2, through `nestor train` on the
embedded (local) Ray, and the start-up overhead from the command to the first step.

Each stage runs as its own `nestor train` process (a fresh local Ray each time, as a user
gets it), stages interleaved round by round. samples/s is the median over steps after the
first three; start-up is the time from launching the command to the first step's report.

    python bench/throughput.py [--rounds 1] [--steps 12] [--spec examples/mnist1d-adan-32k.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(spec: dict, out: Path) -> tuple[float, float, float]:
    """(median samples/s, start-up seconds, mean step seconds) of one `nestor train`."""
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    start = time.time()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(spec_path), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
        env=env,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]["time"] - records[0]["step_time"]
    steady = [r for r in records[3:] if r.get("samples_per_s")]
    return (
        statistics.median(r["samples_per_s"] for r in steady),
        first - start,
        statistics.mean(r["step_time"] for r in steady),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "mnist1d-adan-32k.json"))
    args = parser.parse_args()
    base = json.loads(Path(args.spec).read_text())
    base.update(max_steps=args.steps, checkpoint_every=0, eval_every=args.steps, num_workers=2)
    results: dict[int, list[tuple[float, float, float]]] = {0: [], 1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for stage in results:
                results[stage].append(
                    run({**base, "zero_stage": stage}, Path(tmp) / f"r{r}-s{stage}")
                )
    print(
        f"{base['model']} on {base['dataset']['name']}, {base['optimizer']['name']}, "
        f"global batch {base['batch_size']} (micro {base['micro_batch_size']}), 2 workers "
        f"on the embedded Ray, {args.steps} steps, {args.rounds} round(s)"
    )
    print("| ZeRO stage | samples/s | per worker | step s | start-up to first step s |")
    print("|---|---|---|---|---|")
    for stage, runs in results.items():
        sps = statistics.median(x[0] for x in runs)
        startup = statistics.median(x[1] for x in runs)
        step = statistics.median(x[2] for x in runs)
        print(f"| {stage} | {sps:,.0f} | {sps / 2:,.0f} | {step:.2f} | {startup:.1f} |")


if __name__ == "__main__":
    main()
