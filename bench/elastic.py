"""What a resize costs: seconds from the decision to the first step at the new size, an
elastic job's planned resize beside a plain restart of a fixed job's worker group.

On a private local Ray (2 logical CPUs per worker slot, this machine's cores), through
``workers.launcher.run_on_ray``, the path every job's driver takes:

  planned shrink    an elastic job (1 to 2 workers) on 2 is asked for 1 (``resize.json``):
                    it checkpoints at the next step boundary, and the next segment starts
                    from that checkpoint; nothing is recomputed
  planned grow      the same job asked for 2 again
  plain restart     a fixed 2-worker job (Ray Train's FailureConfig) whose rank 1 is killed:
                    Ray restarts the group, which resumes from the latest checkpoint
                    (every ``checkpoint_every`` = 100 steps) and recomputes the steps since

Each event is timed from the decision (the request written, the kill) to the first metric
row of a step after it at the new size (``metrics.jsonl``'s times), and the steps computed
twice are counted. The elastic job is then preempted (asked for 0 workers: it checkpoints
and ends as suspended) and resumed on 2 as the service would relaunch it, and its timeline
is printed: each segment's size, why, and the steps per second it trained at.

    python bench/elastic.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from workers import TrainSpec  # noqa: E402
from workers.elastic import write_resize  # noqa: E402
from workers.launcher import connect_ray, run_on_ray, worker_starts  # noqa: E402
from workers.run_dir import RunDir  # noqa: E402

BASE = {
    "model": "mnist1d-mlp",
    "dataset": {"name": "mnist1d", "num_samples": 4000},
    "optimizer": {"name": "adan", "lr": 0.01},
    "batch_size": 256,
    "micro_batch_size": 64,
    "eval_every": 100_000,
    "checkpoint_every": 100,
}


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait(predicate, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the job did not get there")
        time.sleep(0.02)


def last_step(run: Path) -> int:
    metrics = rows(RunDir(run).metrics)
    return metrics[-1]["step"] if metrics else 0


def first_step_after(run: Path, t0: float, after_step: int) -> tuple[float, int]:
    """(time, step) of the first metric row written after ``t0`` for a step after
    ``after_step``."""
    for row in rows(RunDir(run).metrics):
        if row["time"] > t0 and row["step"] > after_step:
            return row["time"], row["step"]
    raise LookupError


def start(spec: TrainSpec, run: Path, failures: int) -> threading.Thread:
    thread = threading.Thread(
        target=run_on_ray, args=(spec, run), kwargs={"max_failures": failures}, daemon=True
    )
    thread.start()
    return thread


def planned(run: Path, n: int, at_least: int) -> dict:
    wait(lambda: last_step(run) >= at_least)
    t0, before = time.time(), last_step(run)
    write_resize(run, n, f"bench: to {n}")
    wait(
        lambda: any(
            r.get("status") == "running" and r.get("world_size") == n and r["time"] > t0
            for r in rows(RunDir(run).status)
        )
    )
    resized = [r for r in rows(RunDir(run).status) if r.get("status") == "resizing"][-1]["step"]
    wait(lambda: last_step(run) > resized)
    t1, _ = first_step_after(run, t0, resized)
    return {"seconds": t1 - t0, "decided_at": before, "resized_at": resized, "recomputed": 0}


def restart(run: Path, at_least: int) -> dict:
    wait(lambda: last_step(run) >= at_least)
    pid = worker_starts(run)[1]["pid"]
    t0, before = time.time(), last_step(run)
    os.kill(pid, signal.SIGKILL)
    # The group resumes from its latest checkpoint: the first row after t0 is a step it
    # computed again (or the one after the checkpoint).
    wait(lambda: any(r["time"] > t0 for r in rows(RunDir(run).metrics)), timeout=600)
    t1, step = first_step_after(run, t0, 0)
    return {
        "seconds": t1 - t0,
        "decided_at": before,
        "resized_at": step - 1,
        "recomputed": max(before - (step - 1), 0),
    }


def timeline(run: Path, t0: float) -> list[str]:
    """One job's life from status.jsonl: each segment's start (its size and why), the
    steps per second it trained at (from metrics.jsonl's times), and how it ended."""
    status = rows(RunDir(run).status)
    metrics = rows(RunDir(run).metrics)
    lines = []
    for i, row in enumerate(status):
        t = row["time"] - t0
        if row["status"] == "running":
            end = next((r["time"] for r in status[i + 1 :] if r["status"] != "running"), 1e18)
            seg = [m for m in metrics if row["time"] <= m["time"] <= end]
            rate = (
                (seg[-1]["step"] - seg[0]["step"]) / (seg[-1]["time"] - seg[0]["time"])
                if len(seg) > 1 and seg[-1]["time"] > seg[0]["time"]
                else float("nan")
            )
            start = row.get("resumed_from_step", 0)
            lines.append(
                f"| {t:6.1f} | trains on {row.get('world_size')} ({row.get('reason')}) | "
                f"{row.get('world_size')} | from {start} | {rate:.0f} |"
            )
        elif row["status"] == "resizing":
            lines.append(
                f"| {t:6.1f} | checkpoint, resize to {row['next_world_size']} | "
                f"{row['world_size']} | at {row['step']} | |"
            )
        elif row["status"] == "suspended":
            lines.append(
                f"| {t:6.1f} | preempted: checkpoint, workers given back | 0 | at {row['step']} | |"
            )
        elif row["status"] in ("succeeded", "failed"):
            lines.append(f"| {t:6.1f} | {row['status']} | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    connect_ray(None, log_to_driver=False, num_cpus=2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One elastic, preemptible job: 2 -> 1 -> 2, preempted, resumed on 2, to the end.
        run = Path(tmp) / "elastic"
        run.mkdir()
        t0 = time.time()
        write_resize(run, 2, "started on 2")
        spec = TrainSpec.model_validate(
            {
                **BASE,
                "num_workers": {"min": 1, "max": 2},
                "max_steps": args.steps,
                "preemptible": True,
            }
        )
        job = start(spec, run, failures=0)
        results["planned shrink 2 -> 1"] = planned(run, 1, at_least=150)
        results["planned grow 1 -> 2"] = planned(run, 2, at_least=last_step(run) + 150)
        wait(lambda: last_step(run) >= results["planned grow 1 -> 2"]["resized_at"] + 150)
        write_resize(run, 0, "preempted by another job")
        job.join(timeout=300)
        write_resize(run, 2, "resumed on 2")  # as the service relaunches it
        job = start(spec, run, failures=0)
        job.join(timeout=600)
        lines = timeline(run, t0)

        run = Path(tmp) / "fixed"
        fixed = TrainSpec.model_validate({**BASE, "num_workers": 2, "max_steps": 100_000})
        job = start(fixed.model_copy(update={"preemptible": True}), run, failures=3)
        results["plain restart, rank 1 killed"] = restart(run, at_least=250)
        wait(lambda: last_step(run) >= results["plain restart, rank 1 killed"]["decided_at"] + 20)
        write_resize(run, 0, "bench: done")
        job.join(timeout=300)

    print("One elastic, preemptible job of", args.steps, "steps:\n")
    print("| seconds | event | workers | step | steps/s |")
    print("|---:|---|---:|---|---:|")
    print("\n".join(lines))
    print()
    print(
        "| event | decided at step | new size from step | steps computed twice | "
        "seconds to the first step |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['decided_at']} | {r['resized_at'] + 1} | {r['recomputed']} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
