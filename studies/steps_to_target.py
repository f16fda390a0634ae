"""The large-batch study measured as steps to a target (docs/large-batch.md), read from the
Nestor service's own API.

The study is sweeps submitted with `nestor sweep`; this script reads what the service stored,
writes the follow-up sweeps the method asks for, and draws the tables and plots:

    python -m studies.steps_to_target widen --sweeps 1 --out widen.json   # edge winners
    python -m studies.steps_to_target seeds --sweeps 1 2 --out seeds.json # best lr x seeds
    python -m studies.steps_to_target report --sweeps 1 2 --seeds-sweep 3 --out docs/large-batch

Cells, steps-to-target and the lr fit are the service's own (``service.targets``, the code
behind ``GET /v1/sweeps/{id}`` and ``/recipe``), applied to the trials of several sweeps.
The service URL and token come from NESTOR_URL / NESTOR_TOKEN (or the embedded defaults).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from service.client import Client
from service.targets import Cell, cells, recipes

COLORS = {"adan": "#d62728", "adamw": "#1f77b4", "lamb": "#2ca02c", "lookahead(adan)": "#9467bd"}
# A doubling of the batch that cuts the steps by less than this ends perfect-ish scaling
# (perfect: 2x). The critical batch size is the last batch size reached before one does.
CRITICAL_RATIO = 1.6
GRID_STEP = math.sqrt(10)  # the lr grid's spacing: half a decade


def load(client: Client, sweep_ids: list[int]) -> tuple[dict[str, Any], list[Any]]:
    """The sweeps' specs merged (for their varied paths) and every trial as the job record
    ``service.targets`` reads (id, spec, status, reached_target_at_step, times)."""
    merged: dict[str, Any] = {"space": {}, "points": []}
    jobs = []
    for sid in sweep_ids:
        detail = client.sweep_detail(sid)
        merged["space"].update(detail["spec"].get("space", {}))
        merged["points"] += detail["spec"].get("points", [])
        jobs += [SimpleNamespace(**j) for j in client.jobs(sweep=sid, limit=1000)["data"]]
    return merged, jobs


def best_lrs(search: list[Cell]) -> dict[tuple[str, int], Cell]:
    return {(c.optimizer, c.batch_size): c for c in search}


def widen(
    search: list[Cell], base_points: list[dict[str, Any]], jobs: dict[int, Any]
) -> list[dict[str, Any]]:
    """Points one grid step beyond each edge winner (and for a cell where no lr reached the
    target, one step below its smallest lr and above its largest)."""
    budget = {p["batch_size"]: p for p in base_points}
    out = []
    for c in search:
        tried = [r.lr for r in c.lrs]
        if c.best_lr is None:
            extra = [min(tried) / GRID_STEP, max(tried) * GRID_STEP]
        elif c.best_on_edge:
            extra = [c.best_lr / GRID_STEP if c.best_lr == min(tried) else c.best_lr * GRID_STEP]
        else:
            continue
        for lr in extra:
            out.append({**budget[c.batch_size], "optimizer": _optimizer(c, round(lr, 6), jobs)})
    return out


def _optimizer(c: Cell, lr: float, jobs: dict[int, Any]) -> dict[str, Any]:
    """The cell's own optimizer (as its trials ran it) at another lr."""
    return {**jobs[c.lrs[0].job_ids[0]].spec["optimizer"], "lr": lr}


def seeds_points(
    search: list[Cell], base_points: list[dict[str, Any]], jobs: dict[int, Any]
) -> list[dict[str, Any]]:
    """One point per cell: its budget and its best lr (cells that never reached: left out)."""
    budget = {p["batch_size"]: p for p in base_points}
    return [
        {**budget[c.batch_size], "optimizer": _optimizer(c, c.best_lr, jobs)}
        for c in search
        if c.best_lr is not None
    ]


def critical_batch(steps: dict[int, float]) -> tuple[int | None, list[float]]:
    """The critical batch size (the last one reached while every doubling before it cut
    the steps at least CRITICAL_RATIO-fold) and each doubling's ratio."""
    sizes = sorted(steps)
    ratios = [steps[a] / steps[b] for a, b in itertools.pairwise(sizes)]
    critical = sizes[0] if sizes else None
    for b, r in zip(sizes[1:], ratios, strict=False):
        if r < CRITICAL_RATIO:
            break
        critical = b
    return critical, ratios


def efficiency(steps: dict[int, float]) -> dict[int, float]:
    """Each batch size's steps against perfect scaling from the smallest: 1.0 when doubling
    the batch has halved the steps all the way, 0.5 when it needs twice the steps that
    perfect scaling would."""
    b0 = min(steps)
    return {b: steps[b0] * b0 / (steps[b] * b) for b in steps}


def summary(search: list[Cell], combined: list[Cell]) -> list[dict[str, Any]]:
    """Per (optimizer, batch): the search's best lr and, at that lr, every seed's steps."""
    rows = []
    by_key = {(c.optimizer, c.batch_size): c for c in combined}
    for c in search:
        row = {
            "optimizer": c.optimizer,
            "batch_size": c.batch_size,
            "best_lr": c.best_lr,
            "on_edge": c.best_on_edge,
            "steps": [],
            "median": None,
        }
        if c.best_lr is not None:
            lr_row = next(r for r in by_key[(c.optimizer, c.batch_size)].lrs if r.lr == c.best_lr)
            row["steps"] = lr_row.steps
            row["seeds"] = lr_row.seeds
            done = [s for s in lr_row.steps if s is not None]
            row["median"] = statistics.median(done) if len(done) == len(lr_row.steps) else None
        rows.append(row)
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def batch_label(b: int) -> str:
    return f"{b // 1024}k" if b >= 1024 else str(b)


def _batch_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [batch_label(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("global batch size")
    ax.grid(alpha=0.3, which="both")


def plot_steps(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.3), dpi=120)
    sizes = sorted({r["batch_size"] for r in rows})
    for opt, color in COLORS.items():
        pts = sorted(
            (r["batch_size"], r["median"], min(r["steps"]), max(r["steps"]))
            for r in rows
            if r["optimizer"] == opt and r["median"] is not None
        )
        if not pts:
            continue
        xs, med, lo, hi = zip(*pts, strict=True)
        ax.errorbar(
            xs,
            med,
            yerr=[
                [m - a for m, a in zip(med, lo, strict=True)],
                [b - m for m, b in zip(med, hi, strict=True)],
            ],
            fmt="o-",
            color=color,
            label=opt,
            capsize=3,
            lw=1.4,
        )
    first = [r["median"] for r in rows if r["batch_size"] == sizes[0] and r["median"]]
    if first:
        s0 = min(first)
        ax.plot(
            sizes, [s0 * sizes[0] / b for b in sizes], ":", color="gray", label="perfect scaling"
        )
    ax.set_yscale("log")
    _batch_axis(ax, sizes)
    ax.set_ylabel("steps to the target (median of seeds; bars: min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_best_lr(search: list[Cell], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.3), dpi=120)
    sizes = sorted({c.batch_size for c in search})
    for i, r in enumerate(recipes(search)):
        color = COLORS.get(r.optimizer, "black")
        xs = [p.batch_size for p in r.points]
        # Nudged sideways so that optimizers with the same best lr stay visible.
        nudged = [x * 1.06 ** (i - 1.5) for x in xs]
        ax.plot(nudged, [p.best_lr for p in r.points], "o", color=color, label=r.optimizer)
        if r.exponent is not None:
            ax.plot(
                xs,
                [p.fitted_lr for p in r.points],
                "-",
                color=color,
                lw=1,
                alpha=0.7,
                label=f"  fit: batch^{r.exponent:.2f}",
            )
    ax.set_yscale("log")
    _batch_axis(ax, sizes)
    ax.set_ylabel("best lr (fewest steps to the target)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmaps(combined: list[Cell], path: Path) -> None:
    plt = _plt()
    import matplotlib.colors as mcolors

    opts = [o for o in COLORS if any(c.optimizer == o for c in combined)]
    sizes = sorted({c.batch_size for c in combined})
    lrs = sorted({r.lr for c in combined for r in c.lrs})
    reached = [r.steps[0] for c in combined for r in c.lrs if r.steps and r.steps[0]]
    norm = mcolors.LogNorm(min(reached), max(reached))
    fig, axes = plt.subplots(1, len(opts), figsize=(3.6 * len(opts), 3.9), dpi=120, sharey=True)
    for ax, opt in zip(axes, opts, strict=True):
        grid = [[math.nan] * len(sizes) for _ in lrs]
        for c in (c for c in combined if c.optimizer == opt):
            for r in c.lrs:
                i, j = lrs.index(r.lr), sizes.index(c.batch_size)
                seed0 = r.steps[r.seeds.index(0)] if 0 in r.seeds else None
                grid[i][j] = seed0 if seed0 is not None else -1.0
                label = f"{seed0}" if seed0 is not None else "×"
                ax.text(j, i, label, ha="center", va="center", fontsize=6.5)
        import numpy as np

        values = np.array(grid, dtype=float)
        shown = np.ma.masked_where(~(values > 0), values)
        ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis_r", norm=norm)
        ax.set_xticks(range(len(sizes)), [batch_label(b) for b in sizes])
        ax.set_yticks(range(len(lrs)), [f"{lr:.3g}" for lr in lrs])
        ax.set_title(opt)
        ax.set_xlabel("batch")
    axes[0].set_ylabel("lr (× : target not reached; blank: not run)")
    fig.suptitle("steps to the target over (lr, batch), seed 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wall_clock(jobs: list[Any]) -> tuple[float, float]:
    """(first start to last finish, sum of trials' own time) in seconds."""
    spans = [
        (datetime.fromisoformat(j.started_at), datetime.fromisoformat(j.finished_at))
        for j in jobs
        if j.started_at and j.finished_at
    ]
    wall = (max(b for _, b in spans) - min(a for a, _ in spans)).total_seconds()
    return wall, sum((b - a).total_seconds() for a, b in spans)


def report(client: Client, sweeps: list[int], seeds_sweep: int | None, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    spec, search_jobs = load(client, sweeps)
    search = cells(spec, search_jobs)
    all_ids = sweeps + ([seeds_sweep] if seeds_sweep else [])
    all_spec, all_jobs = load(client, all_ids)
    combined = cells(all_spec, all_jobs)
    rows = summary(search, combined)
    plot_steps(rows, out / "steps-vs-batch.png")
    plot_best_lr(search, out / "best-lr-vs-batch.png")
    plot_heatmaps(combined, out / "steps-heatmap.png")

    sizes = sorted({r["batch_size"] for r in rows})
    lines = ["steps to the target at the best lr: median of seeds [min-max] (best lr)", ""]
    lines.append("| optimizer | " + " | ".join(batch_label(b) for b in sizes) + " |")
    lines.append("|---" * (len(sizes) + 1) + "|")
    for opt in COLORS:
        cellsrow = []
        for b in sizes:
            r = next((x for x in rows if x["optimizer"] == opt and x["batch_size"] == b), None)
            if r is None or r["median"] is None:
                cellsrow.append("not reached" if r else "–")
                continue
            spread = f" [{min(r['steps'])}-{max(r['steps'])}]" if len(r["steps"]) > 1 else ""
            edge = ", edge" if r["on_edge"] else ""
            cellsrow.append(f"{r['median']:g}{spread} ({r['best_lr']:g}{edge})")
        lines.append(f"| {opt} | " + " | ".join(cellsrow) + " |")
    lines += [
        "",
        "steps cut per doubling of the batch; critical batch size (>= "
        f"{CRITICAL_RATIO}x per doubling up to it)",
        "",
    ]
    for opt in COLORS:
        steps = {
            r["batch_size"]: r["median"]
            for r in rows
            if r["optimizer"] == opt and r["median"] is not None
        }
        critical, ratios = critical_batch(steps)
        eff = efficiency(steps)
        kept = [b for b in sorted(eff) if all(eff[x] >= 0.5 for x in eff if x <= b)]
        lines.append(
            f"- {opt}: " + ", ".join(f"{x:.2f}x" for x in ratios) + f"; critical batch {critical}"
            "; scaling efficiency "
            + ", ".join(f"{batch_label(b)} {e:.0%}" for b, e in sorted(eff.items()))
            + f"; largest batch at >= 50%: {kept[-1] if kept else None}"
        )
    lines += ["", "lr recipe (fit through the search's best lrs):", ""]
    for r in recipes(search, 65536):
        if r.exponent is not None:
            lines.append(
                f"- {r.optimizer}: lr = {r.lr_ref:.4g} x (batch / {r.batch_ref}) ^ "
                f"{r.exponent:.3f}, residual {r.residual:.3f} decades; at 64k "
                f"{r.suggested_lr:.3g}"
            )
    lines += ["", "every trial, seed 0 steps per lr:", ""]
    for c in combined:
        lines.append(
            f"- {c.optimizer} {c.batch_size}: " + ", ".join(f"{r.lr:g}: {r.steps}" for r in c.lrs)
        )
    wall, busy = wall_clock(search_jobs)
    lines.append(
        f"\nsearch: {len(search_jobs)} trials, wall {wall / 60:.1f} min, "
        f"trials' own time {busy / 60:.1f} min"
    )
    if seeds_sweep:
        _, seed_jobs = load(client, [seeds_sweep])
        wall, busy = wall_clock(seed_jobs)
        lines.append(
            f"seeds: {len(seed_jobs)} trials, wall {wall / 60:.1f} min, "
            f"trials' own time {busy / 60:.1f} min"
        )
    return "\n".join(lines)


def _sweep_file(client: Client, sweeps: list[int], name: str, points, space) -> dict:
    base = client.sweep_detail(sweeps[0])["spec"]
    return {
        "name": name,
        "base": base["base"],
        "points": points,
        "space": space,
        "search": "grid",
        "max_concurrent": base.get("max_concurrent", 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("widen", "seeds", "report"):
        p = sub.add_parser(name)
        p.add_argument("--sweeps", type=int, nargs="+", required=True, help="the lr search")
        p.add_argument("--out", type=Path, required=True)
        if name == "seeds":
            p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
        if name == "report":
            p.add_argument("--seeds-sweep", type=int)
    args = parser.parse_args()
    client = Client()
    if args.cmd == "report":
        print(report(client, args.sweeps, args.seeds_sweep, args.out))
        return
    spec, jobs = load(client, args.sweeps)
    search = cells(spec, jobs)
    base_points = spec["points"]
    if args.cmd == "widen":
        points = widen(search, base_points, {j.id: j for j in jobs})
        body = _sweep_file(client, args.sweeps, "steps to target: widened lr grid", points, {})
    else:
        points = seeds_points(search, base_points, {j.id: j for j in jobs})
        body = _sweep_file(
            client, args.sweeps, "steps to target: best lr x seeds", points, {"seed": args.seeds}
        )
    args.out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{args.out}: {len(points) * (len(args.seeds) if args.cmd == 'seeds' else 1)} trials")


if __name__ == "__main__":
    main()
