"""The large-batch study's tables and plots, read from the Nestor service's own API.

The study itself is two sweeps submitted with `nestor sweep` (docs/large-batch/*.json); this
script only reads what the service stored:

    python -m studies.large_batch pick-lr --sweep 1          # best lr per optimizer
    python -m studies.large_batch report --lr-search 1 --main 2 --out docs/large-batch

The service URL and token come from NESTOR_URL / NESTOR_TOKEN (or the embedded defaults),
as for the `nestor` CLI.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from service.client import Client
from workers.spec import optimizer_label

COLORS = {"adan": "#d62728", "adamw": "#1f77b4", "lamb": "#2ca02c", "lookahead(adan)": "#9467bd"}


def trials(client: Client, sweep_id: int) -> list[dict[str, Any]]:
    """Each trial of a sweep with its job (spec, times) and final metrics."""
    detail = client.sweep_detail(sweep_id)
    jobs = {j["id"]: j for j in client.jobs(sweep=sweep_id, limit=1000)["data"]}
    return [{**t, "job": jobs[t["job_id"]]} for t in detail["trials_summary"]]


def cells(
    rows: list[dict[str, Any]], metric: str = "val_accuracy"
) -> dict[tuple[str, int], dict[str, Any]]:
    """(optimizer, batch size) -> the best trial there by ``metric`` (several trials share a
    cell when a sweep also searches the learning rate)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for t in rows:
        spec = t["job"]["spec"]
        value = t["final"].get(metric)
        if value is None:
            continue
        key = (optimizer_label(spec), spec["batch_size"])
        if key not in best or value > best[key]["final"][metric]:
            best[key] = t
    return best


def markdown_table(table: dict[tuple[str, int], dict[str, Any]]) -> str:
    optimizers = sorted({o for o, _ in table}, key=list(COLORS).index)
    batches = sorted({b for _, b in table})
    head = "| optimizer | " + " | ".join(f"{b:,}" for b in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for opt in optimizers:
        row = []
        for b in batches:
            t = table.get((opt, b))
            if t is None:
                row.append("–")
                continue
            f = t["final"]
            row.append(f"{100 * f['val_accuracy']:.1f}% ({f['val_loss']:.3f})")
        lines.append(f"| {opt} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def pick_lr(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per optimizer, the base lr (at batch 1024, before sqrt scaling) whose mean final
    validation accuracy over the searched batch sizes is highest."""
    scores: dict[tuple[str, float], list[float]] = defaultdict(list)
    for t in rows:
        spec = t["job"]["spec"]
        acc = t["final"].get("val_accuracy")
        scores[(optimizer_label(spec), spec["optimizer"]["lr"])].append(
            acc if acc is not None else 0.0
        )
    best: dict[str, tuple[float, float]] = {}
    for (opt, lr), accs in scores.items():
        mean = statistics.fmean(accs)
        if opt not in best or mean > best[opt][1]:
            best[opt] = (lr, mean)
    return {opt: lr for opt, (lr, _) in best.items()}


def utilisation(client: Client, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall clock of the sweep and the median samples/s per worker of each trial."""
    start = min(
        datetime.fromisoformat(t["job"]["started_at"]) for t in rows if t["job"]["started_at"]
    )
    end = max(
        datetime.fromisoformat(t["job"]["finished_at"]) for t in rows if t["job"]["finished_at"]
    )
    per_batch: dict[int, list[float]] = defaultdict(list)
    for t in rows:
        s = client.metrics(t["job_id"], keys=["samples_per_s"], max_points=100_000)
        values = [v for v in s["series"].get("samples_per_s", {}).get("value", []) if v]
        if values:
            workers = t["job"]["spec"]["num_workers"]
            per_batch[t["job"]["spec"]["batch_size"]].append(statistics.median(values) / workers)
    busy = sum(
        (
            datetime.fromisoformat(t["job"]["finished_at"])
            - datetime.fromisoformat(t["job"]["started_at"])
        ).total_seconds()
        for t in rows
        if t["job"]["started_at"] and t["job"]["finished_at"]
    )
    return {
        "wall_s": (end - start).total_seconds(),
        "trials_s": busy,
        "per_worker": {b: statistics.median(v) for b, v in sorted(per_batch.items())},
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_batch(table, metric: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for opt in COLORS:
        points = sorted((b, t["final"][metric]) for (o, b), t in table.items() if o == opt)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", label=opt, color=COLORS[opt])
    ax.set_xscale("log", base=2)
    batches = sorted({b for _, b in table})
    ax.set_xticks(batches, [f"{b // 1024}k" for b in batches])
    ax.set_xlabel("global batch size (fixed epoch budget)")
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(client: Client, table, batch: int, path: Path) -> None:
    """Training loss (every step) and validation accuracy against epochs at one batch size."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for opt in COLORS:
        t = table.get((opt, batch))
        if t is None:
            continue
        spec = t["job"]["spec"]
        per_epoch = spec["batch_size"] / train_samples(spec)
        keys = ["train_loss", "val_accuracy"]
        series = client.metrics(t["job_id"], keys=keys, max_points=10_000)["series"]
        for ax, key in zip(axes, keys, strict=True):
            s = series.get(key, {"step": [], "value": []})
            ax.plot(
                [x * per_epoch for x in s["step"]],
                s["value"],
                "-" if key == "train_loss" else "o-",
                label=opt,
                color=COLORS[opt],
                lw=1.2,
            )
    for ax, key in zip(axes, ["training loss", "validation accuracy"], strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"global batch {batch:,} ({spec['epochs']:g} epochs)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_search(rows, path: Path) -> None:
    plt = _plt()
    batches = sorted({t["job"]["spec"]["batch_size"] for t in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), dpi=120)
    for ax, batch in zip(axes if len(batches) > 1 else [axes], batches, strict=True):
        for opt in COLORS:
            pts = sorted(
                (t["job"]["spec"]["optimizer"]["lr"], t["final"].get("val_accuracy") or 0.0)
                for t in rows
                if t["job"]["spec"]["batch_size"] == batch
                and optimizer_label(t["job"]["spec"]) == opt
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, "o-", label=opt, color=COLORS[opt])
        ax.set_xscale("log")
        ax.set_xlabel("base lr (at batch 1024; scaled by sqrt(batch / 1024))")
        ax.set_ylabel("final validation accuracy")
        ax.set_title(f"lr search at batch {batch:,}")
        ax.grid(alpha=0.3)
    axes[0].legend() if len(batches) > 1 else axes.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_samples(spec: dict[str, Any]) -> int:
    from workers.spec import DatasetSpec

    return DatasetSpec(**spec["dataset"]).train_samples()


def report(client: Client, lr_search: int, main: int, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    search_rows, main_rows = trials(client, lr_search), trials(client, main)
    table = cells(main_rows)
    plot_against_batch(table, "val_accuracy", out / "accuracy-vs-batch.png")
    plot_against_batch(table, "val_loss", out / "loss-vs-batch.png")
    for batch in (min(b for _, b in table), max(b for _, b in table)):
        plot_curves(client, table, batch, out / f"curves-{batch // 1024}k.png")
    plot_lr_search(search_rows, out / "lr-search.png")
    use = utilisation(client, main_rows)
    search_use = utilisation(client, search_rows)
    lines = [
        "main sweep: final validation accuracy (validation loss)",
        markdown_table(table),
        "",
        "lr search: best of three learning rates per cell",
        markdown_table(cells(search_rows)),
        "",
        f"chosen base lr per optimizer: {pick_lr(search_rows)}",
        f"main sweep wall clock {use['wall_s'] / 60:.1f} min (trials' own time "
        f"{use['trials_s'] / 60:.1f} min); lr search {search_use['wall_s'] / 60:.1f} min",
        "median samples/s per worker by batch size: "
        + ", ".join(f"{b}: {v:,.0f}" for b, v in use["per_worker"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pick-lr")
    p.add_argument("--sweep", type=int, required=True)
    p = sub.add_parser("report")
    p.add_argument("--lr-search", type=int, required=True)
    p.add_argument("--main", type=int, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/large-batch"))
    args = parser.parse_args()
    client = Client()
    if args.cmd == "pick-lr":
        rows = trials(client, args.sweep)
        print(markdown_table(cells(rows)))
        for opt, lr in pick_lr(rows).items():
            print(f"{opt}: lr {lr:g} at batch 1024, {math.sqrt(32) * lr:.4g} at 32768")
    else:
        print(report(client, args.lr_search, args.main, args.out))


if __name__ == "__main__":
    main()
