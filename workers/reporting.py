"""The reporting seam: where metrics and status go. One interface, several sinks.

The training loop calls ``reporter.metrics(step, {...})`` and ``reporter.status(...)`` on rank
0 only; the service plugs in its own sink (HTTP ingest) later. Here: a JSON-lines file and
the console, combined with ``Fanout``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    """What the training loop reports to."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def status(self, status: str, **details: Any) -> None: ...

    def resume(self, step: int) -> None:
        """Training restarts after ``step`` (from a checkpoint): forget later reports."""


def _clean(values: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN/inf: a non-finite value is reported as null, never dropped.
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


class JsonlReporter:
    """Appends one JSON object per report to ``path``: {"step", "time", metrics...};
    status changes go to ``path``'s sibling ``status.jsonl``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.status_path = self.path.with_name("status.jsonl")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **_clean(values)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def status(self, status: str, **details: Any) -> None:
        with open(self.status_path, "a") as f:
            f.write(json.dumps({"time": time.time(), "status": status, **details}) + "\n")

    def resume(self, step: int) -> None:
        """Drop reports after ``step``, written before a crash, so that every step appears
        once in the file after a restart from a checkpoint."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


class ConsoleReporter:
    """One line per report, for logs (the CLI's progress bar reads the JSONL instead)."""

    def __init__(self, keys: tuple[str, ...] = ("train_loss", "val_loss", "lr")) -> None:
        self.keys = keys

    def metrics(self, step: int, values: dict[str, float]) -> None:
        shown = " ".join(f"{k}={values[k]:.4g}" for k in self.keys if k in values)
        print(f"step {step}: {shown}", flush=True)

    def status(self, status: str, **details: Any) -> None:
        print(f"status: {status} {details if details else ''}".rstrip(), flush=True)

    def resume(self, step: int) -> None:
        print(f"resuming after step {step}", flush=True)


class Fanout:
    """Sends every report to each of several reporters."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.metrics(step, values)

    def status(self, status: str, **details: Any) -> None:
        for r in self.reporters:
            r.status(status, **details)

    def resume(self, step: int) -> None:
        for r in self.reporters:
            r.resume(step)
