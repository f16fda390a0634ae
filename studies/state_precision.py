"""Optimizer state in fp32, bf16 and int8 against a peer's 8-bit AdamW (docs/state-precision.md).

Two measurements, each trial in one process through the workers' own data, model,
initialisation, batch order, lr schedule and evaluation (``workers.loop.setup``,
``workers.data.micro_batches``, ``workers.schedule.lr_factor``, ``workers.loop.evaluate``,
``TrainSpec.evaluates_at``), with only the optimizer swapped: Nestor's from
``create_optimizer`` at each ``state_precision``, or torchao's ``AdamW8bit`` (the peer):

- ``steps``: the large-batch study's steps-to-target protocol (docs/large-batch.md) at its
  best lr per (optimizer, batch), the cells read from its own sweep file;
- ``char``: the char-transformer for a fixed number of steps, final validation loss.

    python -m studies.state_precision steps --seeds 0 1 2   # -> docs/state-precision/steps.json
    python -m studies.state_precision char --seeds 0 1      # -> docs/state-precision/char.json
    python -m studies.state_precision check-loop            # this script against a job's loop
    python -m studies.state_precision report                # the tables (stdout)

Results are appended as trials finish; a rerun skips the trials its JSON already holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "state-precision"
STUDY_CELLS = ROOT / "docs" / "large-batch" / "steps-seeds.json"  # the best lr per cell
PEER = "torchao-8bit"  # torchao.optim.AdamW8bit
STATES = ("fp32", "bf16", "int8", PEER)
BATCHES = (1024, 8192, 32768)
OPTIMIZERS = ("adan", "adamw")
WITHIN = 0.05  # a low-bit cell "matches" fp32 when its median is within 5% of fp32's

# The char-transformer's fixed budget: 64 sequences of 64 bytes a step, 600 steps (1.2
# epochs of 32,000 training sequences). lr, weight decay, clipping and the cosine schedule
# are examples/char-transformer.json's, one lr for both optimizers.
CHAR = {
    "model": "char-transformer",
    "dataset": {"name": "pystdlib-chars", "num_samples": 34_000, "val_fraction": 0.06},
    "batch_size": 64,
    "micro_batch_size": 64,
    "max_steps": 600,
    "lr_schedule": {"kind": "cosine", "warmup_steps": 20},
    "max_grad_norm": 1.0,
    "eval_every": 150,
    "num_workers": 1,
    "zero_stage": 0,
}
CHAR_LR = 3e-3
CHAR_WD = 0.02


@dataclass(frozen=True)
class Trial:
    """One run: which study, which optimizer and state format, which cell and seed."""

    study: str  # "steps" | "char"
    optimizer: str  # "adan" | "adamw"
    state: str  # one of STATES
    batch_size: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.study}/{self.optimizer}/{self.state}/{self.batch_size}/{self.seed}"


# ------------------------------------------------------------------------------ the specs
def steps_spec(optimizer: str, batch_size: int, seed: int):
    """The study's own spec for a cell: its sweep's base and the cell's point (best lr,
    budget, micro-batch), at ``seed``."""
    from workers.spec import TrainSpec

    sweep = json.loads(STUDY_CELLS.read_text())
    points = [
        p
        for p in sweep["points"]
        if p["batch_size"] == batch_size
        and p["optimizer"]["name"] == optimizer
        and "lookahead" not in p["optimizer"]
    ]
    if len(points) != 1:
        raise ValueError(f"{STUDY_CELLS.name}: {len(points)} points for {optimizer} {batch_size}")
    return TrainSpec.model_validate({**sweep["base"], **points[0], "seed": seed})


def char_spec(optimizer: str, seed: int):
    from workers.spec import TrainSpec

    opt = {"name": optimizer, "lr": CHAR_LR, "weight_decay": CHAR_WD}
    return TrainSpec.model_validate({**CHAR, "optimizer": opt, "seed": seed})


def spec_of(trial: Trial):
    if trial.study == "steps":
        return steps_spec(trial.optimizer, trial.batch_size, trial.seed)
    return char_spec(trial.optimizer, trial.seed)


# -------------------------------------------------------------------------- the optimizers
def build_optimizer(model, spec, state: str):
    """Nestor's optimizer for the job's spec at ``state``, or the peer with the same
    parameter groups (1-D tensors at weight decay 0) and hyperparameters."""
    from optimizers import create_optimizer
    from optimizers.registry import param_groups_weight_decay

    # Clipping, where the spec asks for it, is the loop's, for every contender alike.
    ospec = spec.optimizer_spec().model_copy(update={"max_grad_norm": 0.0})
    if state != PEER:
        return create_optimizer(
            model.parameters(), ospec.model_copy(update={"state_precision": state})
        )
    if ospec.name != "adamw" or ospec.betas or ospec.eps:
        raise ValueError(f"the peer is AdamW at its defaults, not {ospec}")
    from torchao.optim import AdamW8bit

    wd = 0.01 if ospec.weight_decay is None else ospec.weight_decay  # both classes' default
    groups = param_groups_weight_decay(model.parameters(), wd)
    # betas (0.9, 0.999), eps 1e-8 and the 4,096-element floor below which state stays
    # fp32 are the same in both classes.
    return AdamW8bit(groups, lr=ospec.lr, weight_decay=wd)


def set_lr(group: dict, lr: float) -> None:
    # torchao keeps lr as a tensor, so that its compiled step is not recompiled per value.
    if hasattr(group["lr"], "fill_"):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def state_nbytes(opt) -> int:
    """Bytes of per-parameter state (codes and scales for 8-bit; step counters left out)."""
    import torch

    total = 0
    for entry in opt.state.values():
        for v in entry.values():
            if hasattr(v, "codes") and hasattr(v, "scale"):  # torchao's OptimState8bit
                total += v.codes.nbytes + v.scale.nbytes
            elif isinstance(v, torch.Tensor) and v.ndim > 0:
                total += v.nbytes
    return total


# ------------------------------------------------------------------------------- one trial
def run_trial(trial: Trial) -> dict[str, Any]:
    """Train one trial as ``workers.loop.train`` does with one worker (same setup, batches,
    schedule, skip of non-finite steps, evaluation cadence and stop), minus checkpoints,
    reports and ZeroOptimizer, whose single-process stage 0 steps the same elementwise math
    over flat buffers (``check-loop`` compares the two)."""
    import torch

    from workers.data import micro_batches
    from workers.loop import Session, evaluate, params_sha256, setup
    from workers.schedule import lr_factor

    torch.set_num_threads(1)  # one core per trial, as the study's 1-CPU workers had
    spec = spec_of(trial)
    device = torch.device("cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        session = Session(0, 1, device, Path(run_dir))
        data, model, objective = setup(spec, session)
    opt = build_optimizer(model, spec, trial.state)
    peak_lrs = [float(g["lr"]) for g in opt.param_groups]
    batches = micro_batches(data, spec, 0, 1, 0, device)
    accum, evals, reached, bad_steps, diverged = spec.accumulation_steps, [], None, 0, False
    clip = spec.optimizer_spec().max_grad_norm
    train_seconds = 0.0
    for step in range(spec.max_steps):
        t0 = time.perf_counter()
        for group, peak in zip(opt.param_groups, peak_lrs, strict=True):
            set_lr(group, peak * lr_factor(step, spec.max_steps, spec.lr_schedule))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(accum):
            x, y = next(batches)
            loss = objective(model(x), y)
            loss_sum += loss.detach().double() / accum
            (loss / accum).backward()
        if not torch.isfinite(loss_sum):
            opt.zero_grad()
            bad_steps += 1
            if bad_steps >= spec.max_bad_steps:  # the job fails here: the target is not reached
                diverged = True
                break
            continue
        bad_steps = 0
        if clip:  # as ZeroOptimizer does: by the global norm, before the step
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        train_seconds += time.perf_counter() - t0
        done = step + 1
        if spec.evaluates_at(done):
            metrics = evaluate(
                model, data, objective, spec, session, max(spec.micro_batch_size, 1024)
            )
            evals.append({"step": done, "train_loss": loss_sum.item(), **metrics})
            if spec.stop_at is not None and spec.stop_at.reached(metrics):
                reached = done
                break
    return {
        **asdict(trial),
        "lr": spec.optimizer_spec().lr,
        "max_steps": spec.max_steps,
        "reached_target_at_step": reached,
        "diverged": diverged,
        "final": evals[-1] if evals else None,
        "evals": evals,
        "state_bytes": state_nbytes(opt),
        "params_sha256": params_sha256(model),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


# -------------------------------------------------------------------------- the grid, saved
def environment() -> dict[str, Any]:
    import torch

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    commit = git("log", "-1", "--format=%H", "--", "optimizers") or None
    sources = hashlib.sha256()
    for path in sorted((ROOT / "optimizers").rglob("*.py")):
        sources.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "torch": torch.__version__,
        "torchao": torchao_version,
        # Outside a checkout (a snapshot from `git archive`) git says nothing; the digest
        # of optimizers/*.py still names the code that ran.
        "optimizers_commit": commit,
        "optimizers_dirty": bool(git("status", "--porcelain", "--", "optimizers"))
        if commit
        else None,
        "optimizers_sha256": sources.hexdigest(),
        "path": "create_optimizer (a plain single-process optimizer), not ZeroOptimizer",
    }


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "trials": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in Trial.__dataclass_fields__}


def run_grid(trials: list[Trial], path: Path, jobs: int) -> None:
    """Run the trials ``path`` does not hold yet, ``jobs`` at a time, saving each result as
    it arrives (in the order given: a seed's trials before the next seed's)."""
    results = load_results(path)
    done = {Trial(**_fields(t)).key for t in results["trials"]}
    todo = [t for t in trials if t.key not in done]
    print(f"{len(todo)} trials to run ({len(trials) - len(todo)} already in {path})", flush=True)
    if not todo:
        return
    results["runs"].append({**environment(), "trials": len(todo)})
    started = time.time()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_trial, t): t for t in todo}
        for future in as_completed(futures):
            trial = futures[future]
            try:
                record = future.result()
            except Exception as e:  # record it; the grid goes on
                record = {**asdict(trial), "error": f"{type(e).__name__}: {e}"}
            results["trials"].append(record)
            results["runs"][-1]["wall_seconds"] = round(time.time() - started, 1)
            save_results(path, results)
            what = record.get("reached_target_at_step") or record.get("final", {}) or record
            print(f"{trial.key}: {what} ({record.get('wall_seconds')} s)", flush=True)


def steps_trials(seeds: list[int], batches: list[int], states: list[str]) -> list[Trial]:
    out = []
    for seed in seeds:  # seed by seed, so an interrupted grid is complete per seed
        for batch in sorted(batches, reverse=True):  # the long trials first
            for opt in OPTIMIZERS:
                for state in states:
                    if state == PEER and opt != "adamw":
                        continue
                    out.append(Trial("steps", opt, state, batch, seed))
    return out


def char_trials(seeds: list[int], states: list[str]) -> list[Trial]:
    return [
        Trial("char", opt, state, CHAR["batch_size"], seed)
        for seed in seeds
        for opt in OPTIMIZERS
        for state in states
        if state != PEER or opt == "adamw"
    ]


# ------------------------------------------------------------------ the job's loop, compared
def check_loop(optimizer: str, batch_size: int, seed: int, state: str) -> dict[str, Any]:
    """The same cell through ``workers.loop.train`` itself (ZeroOptimizer at stage 0 in a
    gloo group of one, as a job's worker runs it) beside this script's ``run_trial``."""
    import torch
    import torch.distributed as dist

    from workers.loop import Session, train

    torch.set_num_threads(1)
    spec = steps_spec(optimizer, batch_size, seed)
    spec = spec.model_copy(
        update={"optimizer": spec.optimizer.model_copy(update={"state_precision": state})}
    )
    with tempfile.TemporaryDirectory() as run_dir:
        init = f"file://{run_dir}/pg"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        try:
            job = train(spec, Session(0, 1, torch.device("cpu"), Path(run_dir)), None)
        finally:
            dist.destroy_process_group()
    ours = run_trial(Trial("steps", optimizer, state, batch_size, seed))
    return {
        "cell": f"{optimizer} {batch_size} seed {seed} {state}",
        "job_loop_steps": job["reached_target_at_step"],
        "script_steps": ours["reached_target_at_step"],
        "same_parameters": job["params_sha256"] == ours["params_sha256"],
    }


# ------------------------------------------------------------------------------ the report
def fmt_steps(steps: list[int | None]) -> str:
    if any(s is None for s in steps):
        reached = sorted(s for s in steps if s is not None)
        return f"{len(reached)}/{len(steps)} reached" + (f" {reached}" if reached else "")
    return f"{statistics.median(steps):g} [{min(steps)}-{max(steps)}]"


def steps_table(trials: list[dict[str, Any]]) -> str:
    """Median [min-max] steps to the target per cell and state, and the verdict against
    fp32's median."""
    cells: dict[tuple[str, int, str], list[dict]] = {}
    for t in trials:
        if "error" not in t:
            cells.setdefault((t["optimizer"], t["batch_size"], t["state"]), []).append(t)
    lines = [
        "| optimizer | batch | lr | fp32 | bf16 | int8 | torchao AdamW8bit | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for opt in OPTIMIZERS:
        for batch in BATCHES:
            base = cells.get((opt, batch, "fp32"))
            if not base:
                continue
            base_steps = [t["reached_target_at_step"] for t in base]
            base_median = statistics.median(base_steps) if None not in base_steps else math.inf
            row = [opt, f"{batch // 1024}k", f"{base[0]['lr']:g}"]
            seeds = set()
            for state in STATES:
                got = cells.get((opt, batch, state))
                if not got:
                    row.append("-" if state != PEER or opt == "adamw" else "n/a")
                    continue
                seeds |= {t["seed"] for t in got}
                steps = [t["reached_target_at_step"] for t in got]
                text = fmt_steps(steps)
                if state != "fp32":
                    if None in steps:
                        text += " **not within 5%**"
                    else:
                        ratio = statistics.median(steps) / base_median - 1
                        mark = "" if abs(ratio) <= WITHIN else " **not within 5%**"
                        text += f" ({ratio:+.1%}){mark}"
                row.append(text)
            row.append(",".join(str(s) for s in sorted(seeds)))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def char_table(trials: list[dict[str, Any]]) -> str:
    """Final validation loss (bits per byte) per optimizer and state, per seed, and the
    difference from fp32 of the same seed."""
    by = {(t["optimizer"], t["state"], t["seed"]): t for t in trials if "error" not in t}
    seeds = sorted({t["seed"] for t in trials if "error" not in t})
    lines = [
        "| optimizer | seed | fp32 | bf16 | int8 | torchao AdamW8bit |",
        "|---|---|---|---|---|---|",
    ]
    for opt in OPTIMIZERS:
        for seed in seeds:
            base = by.get((opt, "fp32", seed))
            row = [opt, str(seed)]
            for state in STATES:
                t = by.get((opt, state, seed))
                if t is None:
                    row.append("-" if state != PEER or opt == "adamw" else "n/a")
                    continue
                loss = t["final"]["val_loss"]
                text = f"{loss:.4f}"
                if base is not None and state != "fp32":
                    text += f" ({loss - base['final']['val_loss']:+.4f})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="steps to 90%% at the study's best lrs")
    steps.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    steps.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    steps.add_argument("--states", nargs="+", default=list(STATES), choices=STATES)
    steps.add_argument("--jobs", type=int, default=2, help="trials at a time")
    steps.add_argument("--out", type=Path, default=OUT / "steps.json")
    char = sub.add_parser("char", help="the char-transformer's final validation loss")
    char.add_argument("--seeds", type=int, nargs="+", default=[0])
    char.add_argument("--states", nargs="+", default=list(STATES), choices=STATES)
    char.add_argument("--jobs", type=int, default=2)
    char.add_argument("--out", type=Path, default=OUT / "char.json")
    check = sub.add_parser("check-loop", help="a cell through workers.loop.train and here")
    check.add_argument("--cells", nargs="+", default=["adan:1024:0:fp32", "adamw:1024:0:fp32"])
    report = sub.add_parser("report", help="the tables, from the JSON files")
    report.add_argument("--steps", type=Path, default=OUT / "steps.json")
    report.add_argument("--char", type=Path, default=OUT / "char.json")
    report.add_argument(
        "--rerun", type=Path, help="steps trials that replace --steps' of the same cell and seed"
    )
    args = parser.parse_args()

    if args.command == "steps":
        run_grid(steps_trials(args.seeds, args.batches, args.states), args.out, args.jobs)
    elif args.command == "char":
        run_grid(char_trials(args.seeds, args.states), args.out, args.jobs)
    elif args.command == "check-loop":
        for cell in args.cells:
            opt, batch, seed, state = cell.split(":")
            print(json.dumps(check_loop(opt, int(batch), int(seed), state)), flush=True)
    else:
        if args.steps.exists():
            trials = load_results(args.steps)["trials"]
            if args.rerun:
                newer = {Trial(**_fields(t)).key: t for t in load_results(args.rerun)["trials"]}
                trials = [newer.pop(Trial(**_fields(t)).key, t) for t in trials] + list(
                    newer.values()
                )
            print(steps_table(trials) + "\n")
        if args.char.exists():
            print(char_table(load_results(args.char)["trials"]))


if __name__ == "__main__":
    main()
