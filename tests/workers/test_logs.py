"""The job log: what a process and its children write to fd 1 and 2 lands in the run's
log with its prefix, writers in several processes never tear or lose each other's lines,
and the cap drops whole segments from the oldest end."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

from workers.logs import JobLog

SCRIPT = """
import os, subprocess, sys
from workers.logs import capture
with capture(sys.argv[1], "rank 3"):
    print("a print")
    os.write(2, b"straight to fd 2\\npartial")
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
print("after")
"""


def test_capture_takes_prints_c_level_writes_and_children(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = JobLog(tmp_path / "logs").read().lines  # fd 1 and 2 are read by a thread each
    assert sorted(lines) == [
        "[rank 3] a print",
        "[rank 3] from a child process",
        "[rank 3] partial",  # the last line, without its newline
        "[rank 3] straight to fd 2",
    ]
    # The original streams still got everything, and after the block only them.
    assert done.stdout.split() == ["a", "print", "from", "a", "child", "process", "after"]
    assert done.stderr == "straight to fd 2\npartial"


def _writer(directory: str, who: int) -> None:
    log = JobLog(directory)
    for i in range(200):
        log.append([f"[rank {who}] {i}", f"[rank {who}] {i} again"])


def test_writers_in_several_processes_keep_every_line_whole(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    page = JobLog(tmp_path).read(0, 10_000)
    assert page.next == len(page.lines) == 3 * 200 * 2 and page.dropped == 0
    for w in range(3):
        mine = [line for line in page.lines if line.startswith(f"[rank {w}] ")]
        assert mine == [f"[rank {w}] {i}{s}" for i in range(200) for s in ("", " again")]


def test_cursor_paging_reads_each_line_once_across_segments(tmp_path):
    log = JobLog(tmp_path, cap=8192)
    for i in range(3000):
        log.append([f"line {i:04d}"])
    seen, since = [], 0
    while True:
        page = log.read(since, 333)
        if not page.lines:
            break
        seen += page.lines
        since = page.next
    first = log.read(0, 1).first
    assert seen == [f"line {i:04d}" for i in range(first, 3000)]
    assert log.read(0, 1).dropped == first > 0  # 3000 lines of 10 bytes exceed the cap
