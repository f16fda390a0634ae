"""Elastic jobs: the world size an elastic job should train on, and why.

``RUN/resize.json`` holds ``{"num_workers": N, "reason": "..."}``: written by the service (at
launch, when capacity frees, a resize by hand, a preemption) or by the job's driver (a lost
worker), always whole (a temporary file renamed over it). ``N = 0`` suspends a preemptible
job: it checkpoints at its next step boundary and ends as ``suspended``, and the service
queues it again, to resume from there. Rank 0 reads it at every step;
the ranks agree on it through the step's loss all-reduce; when it differs from the size they
train on they checkpoint at that step boundary and end the segment as ``resized``, and the
driver starts the next segment at the new size from that checkpoint. A job's optimization
does not change: the global batch and its order are a function of the step and the seed
alone, and ZeroOptimizer's checkpoint restores at any world size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .run_dir import RunDir


@dataclass(frozen=True)
class Resize:
    num_workers: int
    reason: str


def write_resize(run_dir: Path, num_workers: int, reason: str) -> None:
    """Ask the job in ``run_dir`` to train on ``num_workers`` workers (atomically)."""
    path = RunDir(run_dir).resize
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"num_workers": int(num_workers), "reason": reason[:300]}))
    os.replace(tmp, path)


def read_resize(run_dir: Path) -> Resize | None:
    """The size asked for (0: suspend), or None when none is (or the file is not a valid
    request)."""
    try:
        data = json.loads(RunDir(run_dir).resize.read_text())
        n = int(data["num_workers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Resize(n, str(data.get("reason") or "resized")) if n >= 0 else None


class Watch:
    """Rank 0's view of ``resize.json``, re-read only when the file changes (a stat per
    step)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).resize
        self.run_dir = Path(run_dir)
        self._seen: tuple[int, int] | None = None
        self._value: Resize | None = None

    def current(self) -> Resize | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key != self._seen:
            self._seen, self._value = key, read_resize(self.run_dir)
        return self._value
