"""The run directory's layout (workers.run_dir): pure path arithmetic, checked without I/O,
and the one place that spells a run directory's file names."""

from __future__ import annotations

import re
from pathlib import Path

from workers.run_dir import CheckpointDir, RunDir

ROOT = Path(__file__).resolve().parents[2]


def test_every_name_hangs_off_the_root():
    run = RunDir(Path("/runs/job-7"))
    assert run.result == Path("/runs/job-7/result.json")
    assert run.metrics.name == "metrics.jsonl" and run.status.name == "status.jsonl"
    assert run.error(2) == Path("/runs/job-7/error-rank2.txt")
    assert RunDir.error_rank(run.error(11)) == "11"
    assert run.setup_error(0).name == "setup-error-rank0.txt"
    assert run.logs == Path("/runs/job-7/logs") and run.owner.name == "nestor-job.json"
    assert RunDir("/runs/x").root == Path("/runs/x"), "a str root becomes a Path"


def test_checkpoints_are_named_by_step_and_parsed_back():
    run = RunDir(Path("/r"))
    c = run.checkpoint(400)
    assert c == CheckpointDir(Path("/r/checkpoints/step-00000400"), 400)
    assert c.complete.name == "complete.json" and c.rng(3).name == "rng3.pt"
    assert (c.model.name, c.optimizer.name) == RunDir.PORTABLE
    assert run.checkpoint_at(c.path) == c
    assert run.checkpoint_at(Path("/r/checkpoints/step-123456789")).step == 123456789
    for other in ("step-", "step-12a", "steps-00000001", "step-00000001.tmp"):
        assert run.checkpoint_at(Path("/r/checkpoints") / other) is None, other
    assert Path(c.path.name).match(RunDir.CHECKPOINTS)


def test_nothing_else_spells_a_run_directory_file_name():
    # The names only workers/run_dir.py may write as path literals.
    names = re.compile(
        r'/ "(result\.json|metrics\.jsonl|status\.jsonl|workers\.jsonl|complete\.json|'
        r"model\.pt|optimizer\.pt|metrics\.csv|init_from\.json|spec\.json|nestor-job\.json|"
        r"worker_token|"
        r'checkpoints|logs)"|/ f"(step-|rng|error-rank|setup-error-rank)'
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for folder in ("workers", "service")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "run_dir.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if names.search(line)
    ]
    assert offenders == []
