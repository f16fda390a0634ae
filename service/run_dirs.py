"""Run directories: one per job row, named after its Ray submission id, never shared.

Job ids repeat when a database is reset, and two deployments may share storage, so a run
directory is named after the submission id (job id and creation time) and records its owner
in ``nestor-job.json``; a launch refuses a non-empty directory that is not its job's instead
of resuming from another job's checkpoints and inheriting its metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from workers.run_dir import RunDir


class RunDirTaken(RuntimeError):
    """The directory holds another job's run."""


def owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(RunDir(run_dir).owner.read_text())
    except (OSError, ValueError):
        return None


def prepare(root: Path, job_id: int, submission_id: str, spec: dict[str, Any]) -> Path:
    """The job's run directory, created or (the same submission launched again) reused, with
    its owner record and ``spec.json``; RunDirTaken if it belongs to another run."""
    run_dir = root / submission_id
    if run_dir.is_dir() and any(run_dir.iterdir()):
        found = owner(run_dir)
        if found is None or found.get("submission_id") != submission_id:
            held = f"job {found.get('job_id')} ({found.get('submission_id')})" if found else "?"
            raise RunDirTaken(
                f"run directory {run_dir} is not empty and belongs to another run ({held}); "
                "refusing to start in it"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(RunDir(run_dir).owner, {"job_id": job_id, "submission_id": submission_id})
    write_json(RunDir(run_dir).spec, spec)
    return run_dir


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
