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


class HttpReporter:
    """Sends reports to the Nestor service in batches from a background thread, retrying
    with backoff while the service is away (a restart loses nothing: the buffer waits, and
    the service also backfills from metrics.jsonl when the job ends).

    Uses only the standard library: workers never import the service's packages.
    """

    def __init__(
        self, api_url: str, job_id: int, token: str, flush_every: float = 0.5, max_batch: int = 500
    ) -> None:
        import queue
        import threading

        self.url = f"{api_url.rstrip('/')}/v1/jobs/{job_id}/ingest"
        self.token = token
        self.flush_every, self.max_batch = flush_every, max_batch
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nestor-reporter", daemon=True)
        self._thread.start()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._queue.put({"points": [{"step": step, "time": time.time(), "values": _clean(values)}]})

    def status(self, status: str, **details: Any) -> None:
        if status in ("running", "succeeded", "failed"):
            self._queue.put({"status": status, "error": details.get("error")})

    def resume(self, step: int) -> None:
        self._queue.put({"resume_from_step": step})

    def _post(self, body: dict[str, Any]) -> None:
        import urllib.request

        req = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def _drain(self) -> list[dict[str, Any]]:
        """Merge queued items into batches, keeping order (a status or resume closes one)."""
        batches: list[dict[str, Any]] = []
        current: dict[str, Any] = {"points": []}
        while not self._queue.empty() and len(current["points"]) < self.max_batch:
            item = self._queue.get_nowait()
            current["points"] += item.get("points", [])
            if "status" in item or "resume_from_step" in item:
                current.update({k: v for k, v in item.items() if k != "points"})
                batches.append(current)
                current = {"points": []}
        if current["points"]:
            batches.append(current)
        return batches

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        delay = self.flush_every
        while True:
            stopping = self._stop.is_set()
            pending += self._drain()
            while pending:
                try:
                    self._post(pending[0])
                except Exception:  # the service is away: keep the batch, back off
                    delay = min(delay * 2, 10.0)
                    break
                pending.pop(0)
                delay = self.flush_every
            if stopping and (not pending or time.time() > self._deadline):
                return
            self._stop.wait(delay)

    def close(self, timeout: float = 60.0) -> None:
        """Flush what is left, retrying for up to ``timeout`` seconds."""
        self._deadline = time.time() + timeout
        self._stop.set()
        self._thread.join(timeout + 5)
