"""Why a job's process died, in one line a user can act on.

A process ended by a signal leaves no Python traceback, and Ray's words for it are long and
the same for every cause ("Worker unexpectedly exits with a connection error code 2. End
of file. Some common causes include: (1) the process was killed by the OOM killer ...").
What says more, most exact first:

- **Ray's memory monitor** names itself and the node's figures in the error of each process
  it kills (the raylet's "... were killed due to the node running low on memory. Memory on
  the node (IP: ..., ID: ...) was 14.88GB used / 15.50GB limit (0.960000)" and "Memory usage
  ...B exceeded threshold of ...B (95.0% of ...B limit)"; before Ray 2.5x "... was 15.12GB /
  15.50GB (0.975483), which exceeds the memory usage threshold of 0.95"):
  ``worker rank 1 killed by Ray's memory monitor: node memory 96% used (threshold 95%),
  14.9 of 15.5 GB``.
- **An exit status**: Ray's job supervisor reports its driver's ("Job entrypoint command
  failed with exit code -9"; 128 + N from a shell): ``driver killed by signal 9 (SIGKILL:
  ...)``. A death record (below) gives a Train worker's.
- **The kernel's log** names each process its OOM killer ends ("Out of memory: Killed
  process 4242 (python) total-vm:..., anon-rss:...kB, ..."), where this process may read it
  (root, no ``dmesg_restrict``, the same pid namespace): ``worker rank 1 killed by the
  kernel's OOM killer (signal 9, SIGKILL): out of memory, the process held 9.5 GB``.
- **A Ray process that ended without a word of its own** (Ray's "unexpectedly exits", a
  ``WorkerCrashedError``) and none of the above: read as a SIGKILL, the usual cause and
  the one signal no process can catch (SIGTERM and SIGINT go through Python's and Ray's
  exit paths, which Ray reports otherwise): ``worker rank 1 killed by signal 9 (SIGKILL:
  the kernel's OOM killer or someone's kill -9)``. An inference: to Ray a crash in native
  code (SIGSEGV, SIGBUS), ``os._exit`` or an uncaught SIGHUP looks the same, and only a
  death record tells them apart.

Death records: a parent that waits for a job's process may note the signal that ended it
under the Ray session's ``nestor-deaths/`` (``record``); ``signal_of`` reads it back.

Standard library only: the service imports it to read a Ray job's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

DEATHS = "nestor-deaths"  # in a Ray session's directory

# Why a signal is usually sent, for the ones a training job meets.
_SENDERS = {
    signal.SIGKILL: "the kernel's OOM killer or someone's kill -9",
    signal.SIGTERM: "asked to stop: a kill, or Ray stopping the job",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code, or shared memory (/dev/shm) ran out",
    signal.SIGABRT: "an abort in native code",
}
_MEMORY_MONITOR = ("running low on memory", "memory usage threshold", "NODE_OUT_OF_MEMORY")
_USED = re.compile(r"was ([\d.]+)GB(?: used)? / ([\d.]+)GB(?: limit)? \(([\d.]+)\)")
_THRESHOLD_PERCENT = re.compile(r"exceeded threshold of \d+B \(([\d.]+)% of \d+B limit\)")
_THRESHOLD_FRACTION = re.compile(r"memory usage threshold of (\d+(?:\.\d+)?)")
_VANISHED = (
    "unexpectedly exits with a connection error code",  # the raylet's, for SYSTEM_ERROR
    "The worker died unexpectedly while executing this task",  # WorkerCrashedError
)
_EXIT_CODE = re.compile(r"failed with exit code (-?\d+)")
_SUPERVISOR = "Job supervisor actor died: "  # ray/dashboard/modules/job/job_manager.py
_PID = re.compile(r"\bpid(?::\s*|=)(\d+)")  # ActorDiedError's "pid: 4242", Train's "pid=4242"
_HOST = socket.gethostname()  # whose kernel log this process reads
_OOM_KILL = re.compile(
    r"(?:(?P<why>[\w ]*out of memory): )?Killed process (?P<pid>\d+) \([^)]*\) "
    r"total-vm:\d+kB, anon-rss:(?P<anon>\d+)kB, file-rss:(?P<file>\d+)kB"
    r"(?:, shmem-rss:(?P<shmem>\d+)kB)?"
)


def killed_by_signal(who: str, number: int) -> str:
    """``rank 0 killed by signal 9 (SIGKILL: the kernel's OOM killer or someone's kill -9)``."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"{who} killed by signal {number}"
    sender = _SENDERS.get(number)
    return f"{who} killed by signal {number} ({name}{f': {sender}' if sender else ''})"


def signal_of_exit(code: int | None) -> int | None:
    """The signal an exit status says ended a process: -N from Python's ``subprocess``,
    128 + N from a shell that ran it; None for an exit of its own."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code <= 128 + 64:
        return code - 128
    return None


def _percent(fraction: float, threshold: float | None) -> tuple[str, str | None]:
    """Both as percentages, with a decimal where whole ones would read the same."""
    digits = 1 if threshold is not None and round(fraction * 100) == round(threshold) else 0
    used = f"{fraction * 100:.{digits}f}%"
    return used, None if threshold is None else f"{threshold:.{digits}f}%"


def memory_monitor(who: str, text: str) -> str | None:
    """The line for a kill by Ray's memory monitor that ``text`` (a Ray error) tells of,
    with the node's figures where Ray gave them; None when it tells of none."""
    if not any(mark in text for mark in _MEMORY_MONITOR):
        return None
    line = f"{who} killed by Ray's memory monitor"
    threshold = None
    if found := _THRESHOLD_PERCENT.search(text):
        threshold = float(found.group(1))
    elif found := _THRESHOLD_FRACTION.search(text):
        threshold = float(found.group(1)) * 100
    used = _USED.search(text)
    if used:
        node, limit = _percent(float(used.group(3)), threshold)
        line += f": node memory {node} used"
        if limit is not None:
            line += f" (threshold {limit})"
        line += f", {float(used.group(1)):.1f} of {float(used.group(2)):.1f} GB"
    elif threshold is not None:
        line += f": node memory above its threshold of {threshold:.0f}%"
    return line


def vanished(text: str) -> bool:
    """Whether Ray's ``text`` says a process ended without a word of its own (no Python
    exception, no exit it asked for)."""
    return any(mark in text for mark in _VANISHED)


def kernel_oom(who: str, lines: Iterable[str], pid: int) -> str | None:
    """The line for ``pid``'s kill by the kernel's OOM killer, if one of the kernel's log
    ``lines`` (``mm/oom_kill.c``'s "Killed process ...") says so."""
    for text in lines:
        found = _OOM_KILL.search(text)
        if found and int(found.group("pid")) == pid:
            kb = sum(int(found.group(k) or 0) for k in ("anon", "file", "shmem"))
            why = (found.group("why") or "out of memory").strip().lower()
            return (
                f"{who} killed by the kernel's OOM killer (signal 9, SIGKILL): {why}, "
                f"the process held {kb * 1024 / 1e9:.1f} GB"
            )
    return None


def kernel_log(since: float) -> list[str]:
    """The kernel's log lines from ``since`` (a ``time.time()``) on; [] where this process
    may not read it (``/dev/kmsg``: root's, unless ``kernel.dmesg_restrict`` is 0)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    boot = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)  # its clock's zero
    lines = []
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BrokenPipeError:  # records overwritten while reading: go on
                continue
            except OSError:  # BlockingIOError: the end
                break
            if not record:
                break
            # "priority,sequence,microseconds since boot,flags;message\n continuation"
            head, _, message = record.partition(";")
            with contextlib.suppress(IndexError, ValueError):
                if boot + int(head.split(",")[2]) / 1e6 >= since:
                    lines.append(message.split("\n", 1)[0])
    finally:
        os.close(fd)
    return lines


def explain(who: str, text: str, *, exit_code: int | None = None) -> str | None:
    """The line for ``who``'s death: what Ray's ``text`` says (its memory monitor, a process
    that vanished) or what ``exit_code`` does; None when neither tells of a kill (a Python
    error is its traceback's to tell)."""
    if line := memory_monitor(who, text):
        return line
    if (number := signal_of_exit(exit_code)) is not None:
        return killed_by_signal(who, number)
    if vanished(text):
        return killed_by_signal(who, signal.SIGKILL)
    return None


def driver_death(message: str | None, exit_code: int | None = None) -> str | None:
    """The line for a Ray job whose driver was killed, from Ray's job ``message`` and
    ``exit_code`` (its supervisor's report of the driver's exit: "Job entrypoint command
    failed with exit code -9, last available logs ..."; "Job supervisor actor died: ..."
    when the supervisor was killed, and the driver with it: ray/dashboard/modules/job/).
    None when they tell of no kill."""
    message = message or ""
    if message.startswith(_SUPERVISOR):
        return explain("the driver's Ray job supervisor", message.removeprefix(_SUPERVISOR))
    if exit_code is None and (found := _EXIT_CODE.search(message)):
        exit_code = int(found.group(1))
    number = signal_of_exit(exit_code)
    return None if number is None else killed_by_signal("driver", number)


def of_failure(
    error: BaseException, starts: dict[int, dict[str, Any]], session_dir: str | None = None
) -> str | None:
    """One line for each process of a training run that was killed, from the exception its
    driver got: Ray Train's (``worker_failures`` by rank, or a ``controller_failure``), a
    warm group's (``workers.pool.WarmGroupError``: the same shape), or one Ray error (its
    rank found by the pid in its text). ``starts``: each rank's latest start (its row of
    ``workers.jsonl``: pid, host, time); ``session_dir``: the Ray session's, for death
    records. None when no process was killed (a Python error is its traceback's to tell)."""
    lines = []
    for who, text, start in _failures(error, starts):
        line = memory_monitor(who, text)
        if line is None and vanished(text):
            pid = start.get("pid") if start else None
            number = signal_of(session_dir, pid)
            if number in (None, signal.SIGKILL) and pid and start.get("host") == _HOST:
                line = kernel_oom(who, kernel_log(float(start.get("time", 0))), pid)
            line = line or killed_by_signal(who, number or signal.SIGKILL)
        if line:
            lines.append(line)
    return "\n".join(lines) or None


def _failures(
    error: BaseException, starts: dict[int, dict[str, Any]]
) -> Iterator[tuple[str, str, dict[str, Any] | None]]:
    """(who, Ray's text for its failure, its start) for each process ``error`` reports."""
    by_rank = getattr(error, "worker_failures", None)
    if by_rank:
        for rank, failure in sorted(by_rank.items()):
            yield f"worker rank {rank}", _text(failure), starts.get(rank)
        return
    controller = getattr(error, "controller_failure", None)
    if controller is not None:
        yield "Ray Train's controller", _text(controller), None
        return
    text = _text(error)
    found = _PID.search(text)
    pid = int(found.group(1)) if found else None
    for rank, start in sorted(starts.items()):
        if pid is not None and start.get("pid") == pid:
            yield f"worker rank {rank}", text, start
            return
    yield "a worker", text, None


def _text(error: BaseException) -> str:
    """``error``'s text and its causes' (Ray Train v1 wraps a worker's death in one)."""
    texts, seen = [], 0
    while error is not None and seen < 5:
        texts.append(str(error))
        error, seen = error.__cause__ or error.__context__, seen + 1
    return "\n".join(texts)


def first(died: str | None, error: str | None) -> str | None:
    """``error`` with the line of how the process died before it (once)."""
    if not died:
        return error
    if not error or error.startswith(died):
        return error or died
    return f"{died}\n{error}"


# ------------------------------------------------------------------ death records
def record(session_dir: str, pid: int, number: int) -> None:
    """Note that ``pid`` was ended by signal ``number`` (by the process that waited for it)."""
    directory = Path(session_dir) / DEATHS
    with contextlib.suppress(OSError):
        directory.mkdir(exist_ok=True)
        os.chmod(directory, 0o1777)  # written by each node's processes, read by every job
    with contextlib.suppress(OSError):
        fd = os.open(directory / str(pid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": pid, "signal": number}, f)


def signal_of(session_dir: str | None, pid: int | None) -> int | None:
    """The signal that ended ``pid``, where a death record says so."""
    if not session_dir or not pid:
        return None
    try:
        return int(json.loads((Path(session_dir) / DEATHS / str(pid)).read_text())["signal"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
