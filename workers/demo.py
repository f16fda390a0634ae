"""A one-minute demo: train a small MLP on mnist1d with Adan and print a loss summary.

Run with ``make run`` (or ``python -m workers.demo``). Data is generated locally by the
``mnist1d`` package: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from mnist1d.data import get_dataset_args, make_dataset

from optimizers import create_optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adan", help="registry name, e.g. adamw, lamb")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data_args = get_dataset_args()
    data_args.num_samples = args.samples
    data = make_dataset(data_args)  # generated locally, ~1 s per 5k samples
    x_train = torch.tensor(data["x"], dtype=torch.float32)  # (N, 40)
    y_train = torch.tensor(data["y"], dtype=torch.long)
    x_val = torch.tensor(data["x_test"], dtype=torch.float32)
    y_val = torch.tensor(data["y_test"], dtype=torch.long)

    model = torch.nn.Sequential(
        torch.nn.Linear(40, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 10),
    )
    spec = {"name": args.optimizer, "lr": args.lr, "weight_decay": 0.02}
    opt = create_optimizer(model.named_parameters(), spec)
    steps_per_epoch = len(x_train) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    print(f"mnist1d: {len(x_train)} train / {len(x_val)} val samples; optimizer {spec}")
    print(f"{'epoch':>5} {'train loss':>10} {'val loss':>9} {'val acc':>8}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x_train))
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item()
        if epoch % max(1, args.epochs // 6) == 0 or epoch == args.epochs:
            with torch.no_grad():
                logits = model(x_val)
                val_loss = torch.nn.functional.cross_entropy(logits, y_val).item()
                acc = (logits.argmax(1) == y_val).float().mean().item()
            print(f"{epoch:>5} {total / steps_per_epoch:>10.4f} {val_loss:>9.4f} {acc:>8.1%}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
