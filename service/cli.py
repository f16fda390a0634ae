"""The ``nestor`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydantic


def _fail(message: str) -> None:
    print(f"nestor: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _reason(err: dict[str, Any]) -> str:
    """A pydantic error's message, without the "Value error, " prefix on our own checks."""
    original = err.get("ctx", {}).get("error")
    return str(original) if isinstance(original, ValueError) else err["msg"]


def load_spec_file(path: str, overrides: dict[str, Any] | None = None):
    """Read and validate a TrainSpec JSON file, with errors that name the file and field."""
    from workers import TrainSpec

    p = Path(path)
    if not p.is_file():
        _fail(f"spec file not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        _fail(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(raw, dict):
        _fail(f"{path}: a spec is a JSON object, got {type(raw).__name__}")
    raw.update(overrides or {})
    try:
        return TrainSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        lines = [
            f"{'.'.join(str(x) for x in err['loc']) or 'spec'}: {_reason(err)}"
            for err in e.errors()
        ]
        _fail(f"{path}: invalid spec:\n  " + "\n  ".join(lines))


def _progress(run_dir: Path, total: int, done: threading.Event) -> None:
    """Follow metrics.jsonl with a progress bar until ``done``."""
    from tqdm import tqdm

    path = run_dir / "metrics.jsonl"
    with tqdm(total=total, unit="step", dynamic_ncols=True) as bar:
        pos = 0
        while True:
            finished = done.is_set()
            if path.exists():
                with open(path) as f:
                    f.seek(pos)
                    for line in f:
                        if not line.endswith("\n"):
                            break
                        pos += len(line)
                        rec = json.loads(line)
                        bar.n = min(total, rec["step"])
                        post = {"loss": rec.get("train_loss")}
                        if rec.get("samples_per_s"):
                            post["samples/s"] = f"{rec['samples_per_s']:.0f}"
                        if rec.get("val_accuracy") is not None:
                            post["val_acc"] = f"{rec['val_accuracy']:.3f}"
                        bar.set_postfix(post, refresh=False)
                        bar.refresh()
            if finished:
                return
            time.sleep(0.5)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {"num_workers": args.workers} if args.workers else {}
    spec = load_spec_file(args.spec, overrides)
    from workers.datasets import nestor_home

    run_dir = (
        Path(args.out)
        if args.out
        else (nestor_home() / "runs" / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    if (run_dir / "result.json").exists():
        _fail(f"{run_dir} already holds a finished run; choose another --out")
    print(
        f"nestor: training {spec.model} on {spec.dataset.name} with {spec.optimizer.name}, "
        f"batch {spec.batch_size} over {spec.num_workers} worker(s), ZeRO-{spec.zero_stage}; "
        f"output in {run_dir}",
        file=sys.stderr,
    )
    done = threading.Event()
    bar = threading.Thread(target=_progress, args=(run_dir, spec.max_steps, done), daemon=True)
    bar.start()
    try:
        if args.local:
            from workers.launcher import run_local

            result = run_local(spec, run_dir)
        else:
            from workers.launcher import run_on_ray

            result = run_on_ray(
                spec, run_dir, ray_address=args.ray_address, max_failures=args.max_failures
            )
    finally:
        done.set()
        bar.join()
    final = result.get("final_metrics", {})
    summary = {k: final[k] for k in ("train_loss", "val_loss", "val_accuracy") if k in final}
    print(
        json.dumps(
            {
                "status": result["status"],
                **summary,
                "params_sha256": result.get("params_sha256"),
                "error": result.get("error"),
            },
            indent=1,
        )
    )
    return 0 if result["status"] == "succeeded" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestor", description="Nestor: large-batch training")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a job spec now (embedded Ray by default)")
    train.add_argument("spec", help="TrainSpec JSON file (see examples/)")
    train.add_argument("--workers", type=int, help="override num_workers")
    train.add_argument("--ray-address", help="an existing Ray cluster (default: local)")
    train.add_argument("--out", help="run directory (default: NESTOR_HOME/runs/NAME-TIME)")
    train.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="worker-group restarts from the latest checkpoint",
    )
    train.add_argument(
        "--local", action="store_true", help="local processes instead of Ray (debugging)"
    )
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
