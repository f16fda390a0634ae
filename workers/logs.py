"""A job's log, kept by Nestor in its run directory: every line the driver and each rank
write to stdout or stderr, prefixed with who wrote it (``[rank 1] ...``, ``[driver] ...``).

Ray keeps a job's output only as long as its head node lives (ray#44561), so each process
of a job tees its own file descriptors 1 and 2 into ``RUN/logs/``: output from C extensions,
``print`` and DataLoader worker processes included. The log is a sequence of numbered lines
in segment files named after their first line; writers append under a lock, and past the
job's cap the oldest segments are dropped (readers are told how many lines went).

    logs/state.json            {"next": next line number}
    logs/000000000000.log      lines 0 ..
    logs/000000004211.log      lines 4211 .. (the segment being written)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .run_dir import RunDir
from .settings import WorkerSettings

SEGMENTS = 8  # the cap is kept in this many pieces: dropping one frees ~1/8 of the cap
MAX_LINE = 16_384  # longer lines are cut (a progress bar without newlines, binary output)


def cap_bytes() -> int:
    """The per-job cap: NESTOR_MAX_LOG_BYTES (``WorkerSettings.max_log_bytes``)."""
    return WorkerSettings.from_env().max_log_bytes


@dataclass
class Page:
    """Lines ``first .. next - 1`` of a log; ``dropped``: lines asked for that the cap had
    already removed (they preceded ``first``)."""

    lines: list[str] = field(default_factory=list)
    first: int = 0
    next: int = 0
    dropped: int = 0


class JobLog:
    """The log in ``directory`` (a run directory's ``logs/``), for writers and readers."""

    def __init__(self, directory: str | os.PathLike[str], cap: int | None = None) -> None:
        self.dir = Path(directory)
        self.cap = cap or cap_bytes()

    # ---------------------------------------------------------------- writing
    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.dir.glob("*.log"):
            with contextlib.suppress(ValueError):
                found.append((int(p.stem), p))
        return sorted(found)

    def append(self, lines: list[str]) -> None:
        """Append whole lines (without their newlines), under the log's lock, then drop the
        oldest segments while the log is over its cap."""
        if not lines:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        data = "".join(line[:MAX_LINE] + "\n" for line in lines).encode("utf-8", "replace")
        with open(self.dir / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.dir / "state.json"
            try:
                next_line = json.loads(state.read_text())["next"]
            except (OSError, ValueError, KeyError):
                next_line = 0
            segments = self._segments()
            if not segments or segments[-1][1].stat().st_size >= self.cap // SEGMENTS:
                segments.append((next_line, self.dir / f"{next_line:012d}.log"))
            with open(segments[-1][1], "ab") as f:
                f.write(data)
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps({"next": next_line + len(lines)}))
            os.replace(tmp, state)
            total = sum(p.stat().st_size for _, p in segments)
            while len(segments) > 1 and total > self.cap:
                _, oldest = segments.pop(0)
                total -= oldest.stat().st_size
                oldest.unlink()

    # ---------------------------------------------------------------- reading
    def read(self, since: int = 0, limit: int = 1000) -> Page:
        """At most ``limit`` lines from line ``since`` on."""
        try:
            end = json.loads((self.dir / "state.json").read_text())["next"]
        except (OSError, ValueError, KeyError):
            return Page(first=since, next=since)
        segments = self._segments()
        if not segments:
            return Page(first=since, next=max(since, end))
        first = segments[0][0]
        page = Page(first=max(since, first), dropped=max(0, first - since))
        at = page.first
        for i, (start, path) in enumerate(segments):
            stop = segments[i + 1][0] if i + 1 < len(segments) else end
            if stop <= at:
                continue
            at = max(at, start)
            try:  # a file only grows until it is dropped, and the state is written after it
                text = path.read_bytes().decode("utf-8", "replace")
            except FileNotFoundError:  # dropped meanwhile by a writer
                continue
            seg_lines = text.split("\n")[: stop - start]
            take = seg_lines[at - start : at - start + limit - len(page.lines)]
            page.lines += take
            at += len(take)
            if len(page.lines) >= limit or not take:
                break
        page.next = at
        return page

    def close(self) -> None:
        """Say that no more lines will come (the driver, the job's last writer, on exit)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "closed").touch()

    @property
    def closed(self) -> bool:
        return (self.dir / "closed").exists()

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` lines."""
        try:
            end = json.loads((self.dir / "state.json").read_text())["next"]
        except (OSError, ValueError, KeyError):
            return []
        return self.read(max(0, end - count), count).lines


# -------------------------------------------------------------------- capturing
class _Tee:
    """Reads a pipe that stands in for fd 1 or 2: each line goes to the original file (so
    Ray's own logs still show it) and, prefixed, to the job's log."""

    def __init__(self, log: JobLog, prefix: str, original: int) -> None:
        self.log, self.prefix, self.original = log, prefix, original
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=self._pump, name=f"nestor-log{original}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        partial = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                chunk = b""
            if chunk:
                with contextlib.suppress(OSError):
                    os.write(self.original, chunk)
            data = partial + chunk
            *complete, partial = data.split(b"\n")
            if not chunk and partial:  # end of output: the last line without its newline
                complete, partial = [*complete, partial], b""
            if complete:
                lines = [self.prefix + c.decode("utf-8", "replace").rstrip("\r") for c in complete]
                with contextlib.suppress(OSError):
                    self.log.append(lines)
            if not chunk:
                os.close(self.read_fd)
                return


@contextlib.contextmanager
def capture(run_dir: str | os.PathLike[str], who: str, last: bool = False) -> Iterator[JobLog]:
    """While inside, everything this process (and any child it starts) writes to fd 1 and 2
    also goes to ``run_dir/logs``, each line prefixed with ``[who] ``. ``last``: this is the
    job's last writer (its driver), and the log is closed on the way out."""
    log = JobLog(RunDir(Path(run_dir)).logs)
    streams = [(sys.stdout, 1), (sys.stderr, 2)]
    for stream, _ in streams:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
            stream.reconfigure(line_buffering=True)  # a print appears when it is printed
    saved, tees = [], []
    try:
        for _, fd in streams:
            original = os.dup(fd)
            tee = _Tee(log, f"[{who}] ", original)
            os.dup2(tee.write_fd, fd)
            os.close(tee.write_fd)
            saved.append((fd, original))
            tees.append(tee)
        yield log
    finally:
        for stream, _ in streams:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        for fd, original in saved:  # the pipes' last writers go: the tees see their end
            os.dup2(original, fd)
        deadline = time.monotonic() + 2.0  # a child still holding the pipe may keep it open
        for tee in tees:
            tee.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for _, original in saved:
            os.close(original)
        if last:
            with contextlib.suppress(OSError):
                log.close()
