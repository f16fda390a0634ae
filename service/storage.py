"""Where a job's output lives, and what of it the API hands out.

Run directories sit under one root (``NESTOR_RUNS_DIR``, default ``HOME/runs``): a local
directory for one machine, a shared filesystem mounted at the same path on every node for a
cluster (workers write there, the service reads there). Everything the API serves from a run
goes through ``RunStorage``, so another backend replaces this one class.

A job's artifacts are a fixed set of names, each mapped to one file; nothing else in the
run directory is reachable, whatever a request asks for:

    model.pt  optimizer.pt  spec.json  result.json  metrics.csv     (the final state)
    step-400-model.pt  step-400-optimizer.pt                        (a checkpoint's)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from workers.logs import JobLog
from workers.run_dir import RunDir

FINAL = RunDir.FINAL
PORTABLE = RunDir.PORTABLE
_CHECKPOINT_NAME = re.compile(r"^step-([1-9]\d{0,9})-(model|optimizer)\.pt$")
_DIGESTS = RunDir.DIGESTS
KEPT_ON_DELETE = {RunDir.LOGS, RunDir.OWNER, _DIGESTS}


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    size: int
    step: int | None  # a checkpoint's step; None for the final state

    @property
    def kind(self) -> str:
        return self.name.removeprefix(f"step-{self.step}-") if self.step else self.name


def _served(run_dir: Path, path: Path) -> int | None:
    """The size of ``path`` if the API may hand it out, else None: a regular file with one
    link, inside the run directory with no symbolic link on the way. User code on the
    workers writes into the run directory; a link named model.pt must not serve the
    service's own files (its signing key, its database) to everyone who may read."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return None
    inside = os.path.join(os.path.realpath(run_dir), os.path.relpath(path, run_dir))
    return st.st_size if os.path.realpath(path) == inside else None


def checkpoint_name(step: int, file: str) -> str:
    return f"step-{step}-{file}"


class RunStorage:
    """Run directories under ``root``: listing, reading, hashing and deleting artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ------------------------------------------------------------------ listing
    def artifacts(self, run_dir: Path) -> list[Artifact]:
        """What the run has left so far: the final files, then each complete checkpoint's
        portable pair, newest first."""
        found = []
        for name in FINAL:
            path = run_dir / name
            if (size := _served(run_dir, path)) is not None:
                found.append(Artifact(name, path, size, None))
        run = RunDir(run_dir)
        steps = []
        for folder in run.checkpoints.glob(RunDir.CHECKPOINTS):
            c = run.checkpoint_at(folder)
            if c is not None and c.complete.exists():
                steps.append((c.step, c.path))
        for step, d in sorted(steps, reverse=True):
            for file in PORTABLE:
                path = d / file
                if (size := _served(run_dir, path)) is not None:
                    found.append(Artifact(checkpoint_name(step, file), path, size, step))
        return found

    def artifact(self, run_dir: Path, name: str) -> Artifact | None:
        """The artifact called ``name``, found by name in the listing only (so a name is
        never turned into a path)."""
        if name in FINAL:
            path = run_dir / name
            size = _served(run_dir, path)
            return None if size is None else Artifact(name, path, size, None)
        m = _CHECKPOINT_NAME.match(name)
        if m is None:
            return None
        step, file = int(m.group(1)), f"{m.group(2)}.pt"
        d = RunDir(run_dir).checkpoint(step)
        path = d.path / file
        size = _served(run_dir, path)
        if size is None or not d.complete.exists():
            return None
        return Artifact(name, path, size, step)

    def checkpoint_steps(self, run_dir: Path) -> list[int]:
        return sorted({a.step for a in self.artifacts(run_dir) if a.step is not None})

    # ------------------------------------------------------------------ digests
    def sha256(self, run_dir: Path, artifact: Artifact) -> str:
        """The artifact's SHA-256, computed once per (size, mtime) and cached in the run."""
        cache_path = RunDir(run_dir).digests
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        st = artifact.path.stat()
        key = [st.st_size, st.st_mtime_ns]
        entry = cache.get(artifact.name)
        if entry and entry[:2] == key:
            return entry[2]
        h = hashlib.sha256()
        with open(artifact.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        cache[artifact.name] = [*key, h.hexdigest()]
        tmp = cache_path.with_name(f"{_DIGESTS}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        return h.hexdigest()

    # ------------------------------------------------------------------ deleting
    def delete(self, run_dir: Path) -> int:
        """Delete everything the run wrote but its log and owner record; the bytes freed."""
        freed = 0
        for entry in run_dir.iterdir():
            if entry.name in KEPT_ON_DELETE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                shutil.rmtree(entry, ignore_errors=True)
            else:
                freed += entry.lstat().st_size
                entry.unlink(missing_ok=True)
        RunDir(run_dir).digests.unlink(missing_ok=True)
        return freed

    # ------------------------------------------------------------------ logs
    def log(self, run_dir: Path) -> JobLog:
        return JobLog(RunDir(run_dir).logs)


def init_files(
    storage: RunStorage, job_id: int, run_dir: str | None, deleted: bool, init: dict
) -> dict[str, str | None] | str:
    """What ``init_from`` (``{"job", "step", "optimizer_state"}``) points at in job
    ``job_id``'s run: {"source", "model", "optimizer"} for the workers, or why it cannot be
    used (a sentence naming what is missing)."""
    step = init.get("step")
    source = f"job {job_id}" + (f" step {step}" if step else "")
    if deleted:
        return f"{source}: its artifacts were deleted"
    if not run_dir:
        return f"{source}: it has not started, so it has no weights yet"
    base = Path(run_dir)
    names = [checkpoint_name(step, f) if step else f for f in PORTABLE]
    found = [storage.artifact(base, n) for n in names]
    if found[0] is None:
        if step:
            steps = storage.checkpoint_steps(base)
            have = f"its checkpoints: {', '.join(map(str, steps))}" if steps else "no checkpoints"
            return f"{source}: there is no checkpoint at step {step} ({have})"
        return f"{source}: it has no model.pt (it has not finished training)"
    if init.get("optimizer_state") and found[1] is None:
        return f"{source}: it has no optimizer.pt"
    return {
        "source": source,
        "model": str(found[0].path),
        "optimizer": str(found[1].path) if init.get("optimizer_state") and found[1] else None,
    }
