"""A run directory's layout: every file and folder a job's processes and the service read or
write there, named in one place. Pure path arithmetic, no I/O: callers open, list and
rename; this module only says where.

    RUN/
      nestor-job.json         the owner record (the service; a launch refuses another's)
      spec.json               the job's TrainSpec as submitted (the service)
      init_from.json          where init_from points (the service, at launch)
      worker_token            the token the job's reports carry (the service, at launch)
      resize.json             an elastic job's world size and why ({"num_workers", "reason"}:
                              the service, or the driver when a worker is lost)
      workers.jsonl           one line per worker start: rank, pid, host, node, time
      metrics.jsonl           one object per report, with "step"
      status.jsonl            one object per status change of the run
      metrics.csv             metrics.jsonl as a table, written at the end
      result.json             status, final metrics, params_sha256 (rank 0, at the end)
      model.pt  optimizer.pt  the portable pair: plain state dicts
      error-rank{r}.txt       the traceback of rank r's failed attempt
      setup-error-rank{r}.txt why rank r could not build its data or model
      logs/                   the job's log (workers.logs.JobLog)
      .artifacts.json         the service's cached digests of the artifacts
      checkpoints/step-{N:08d}/
        complete.json         written last: the checkpoint is whole ({"step", "best"})
        model.pt optimizer.pt the portable pair at step N
        rng{r}.pt             rank r's RNG state
        (ZeroOptimizer's sharded files: optimizers.zero.checkpoint)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint, ``checkpoints/step-{N:08d}`` of a run."""

    path: Path
    step: int

    @property
    def complete(self) -> Path:
        """Written last: the checkpoint is whole once this exists."""
        return self.path / "complete.json"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    def rng(self, rank: int) -> Path:
        return self.path / f"rng{rank}.pt"


@dataclass(frozen=True)
class RunDir:
    """The layout of the run directory at ``root`` (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    OWNER = "nestor-job.json"
    # What the API serves of a finished run, by these names (service.storage).
    FINAL = ("model.pt", "optimizer.pt", "spec.json", "result.json", "metrics.csv")
    PORTABLE = ("model.pt", "optimizer.pt")
    LOGS = "logs"
    DIGESTS = ".artifacts.json"  # the service's cached sha256 per artifact, by size and mtime

    @property
    def owner(self) -> Path:
        return self.root / self.OWNER

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def init_from(self) -> Path:
        return self.root / "init_from.json"

    @property
    def worker_token(self) -> Path:
        """The job's worker token (the service, at launch; mode 0600), for its reports."""
        return self.root / "worker_token"

    @property
    def workers(self) -> Path:
        return self.root / "workers.jsonl"

    @property
    def resize(self) -> Path:
        """An elastic job's world size to train on, and why (``workers.elastic``)."""
        return self.root / "resize.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"

    @property
    def optimizer(self) -> Path:
        return self.root / "optimizer.pt"

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    @property
    def digests(self) -> Path:
        return self.root / self.DIGESTS

    def error(self, rank: int) -> Path:
        return self.root / f"error-rank{rank}.txt"

    ERRORS = "error-rank*.txt"  # glob of every rank's error file

    @staticmethod
    def error_rank(path: Path) -> str:
        """The rank an ``error-rank{r}.txt`` belongs to."""
        return path.stem.removeprefix("error-rank")

    def setup_error(self, rank: int) -> Path:
        return self.root / f"setup-error-rank{rank}.txt"

    SETUP_ERRORS = "setup-error-rank*.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    CHECKPOINTS = "step-*"  # glob of checkpoint folders under ``checkpoints``

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / f"step-{step:08d}", step)

    def checkpoint_at(self, path: Path) -> CheckpointDir | None:
        """The checkpoint a folder under ``checkpoints`` is, or None for another name."""
        m = _CHECKPOINT.match(Path(path).name)
        return CheckpointDir(Path(path), int(m.group(1))) if m else None
