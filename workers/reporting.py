"""The reporting seam: where metrics and status go. One interface, several sinks.

The training loop calls ``reporter.metrics(step, {...})`` and ``reporter.status(...)`` on rank
0 only; the service plugs in its own sink (HTTP ingest) later. Here: a JSON-lines file and
the console, combined with ``Fanout``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from .run_dir import RunDir

log = logging.getLogger("nestor.reporting")
# httpx logs every request at INFO: one line per metrics batch in the job's log.
logging.getLogger("httpx").setLevel(logging.WARNING)


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
        self.status_path = RunDir(self.path.parent).status

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
        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def _step(line: str) -> float:
    """A JSON line's step; a torn or unreadable line counts as after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


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
    """Sends reports to the Nestor service in batches from a background thread.

    - A batch the service rejects (HTTP 4xx: invalid, or not this token's job) is dropped
      and logged; it would be rejected again, and must not hold back the batches after it.
    - Server errors (5xx, 408, 429) and connection errors are retried with exponential
      backoff (capped), so a service restart loses nothing: the buffer waits.
    - The buffer is bounded (``max_points``); past it the oldest points are dropped with a
      warning (they remain in metrics.jsonl, which the service backfills from at the end).
      Status and restart messages are never dropped, and keep their order with the points.
    """

    RETRY = frozenset({408, 429})

    def __init__(
        self,
        api_url: str,
        job_id: int,
        token: str,
        flush_every: float = 0.5,
        max_batch: int = 500,
        max_points: int = 100_000,
        max_delay: float = 10.0,
    ) -> None:
        import threading

        import httpx

        self.url = f"{api_url.rstrip('/')}/v1/jobs/{job_id}/ingest"
        self._http = httpx.Client(
            timeout=10.0,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.flush_every, self.max_batch = flush_every, max_batch
        self.max_points, self.max_delay = max_points, max_delay
        self.dropped_points = 0  # over the buffer's bound
        self.rejected_batches = 0  # refused by the service (4xx)
        self._items: deque[dict[str, Any]] = deque()  # reports in order, not yet sent
        self._buffered = 0  # points in _items
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="nestor-reporter", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- the Reporter interface
    def metrics(self, step: int, values: dict[str, float]) -> None:
        point = {"step": step, "time": time.time(), "values": _clean(values)}
        with self._lock:
            self._items.append({"points": [point]})
            self._buffered += 1
            while self._buffered > self.max_points and self._drop_oldest():
                pass

    def status(self, status: str, **details: Any) -> None:
        if status in ("running", "succeeded", "failed"):
            item = {"status": status, "error": details.get("error")}
            if details.get("reached_target_at_step") is not None:
                item["reached_target_at_step"] = details["reached_target_at_step"]
            if details.get("world_size") is not None:  # an elastic job's (new) size
                item["world_size"] = details["world_size"]
                item["world_reason"] = details.get("reason")
            self._put(item)

    def resume(self, step: int) -> None:
        self._put({"resume_from_step": step})

    def _put(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(item)

    def _drop_oldest(self) -> bool:
        for i, item in enumerate(self._items):
            if item.get("points") and len(item) == 1:
                del self._items[i]
                self._buffered -= len(item["points"])
                if self.dropped_points == 0:
                    log.warning(
                        "reporter buffer full (%d points): dropping the oldest; they stay in "
                        "metrics.jsonl",
                        self.max_points,
                    )
                self.dropped_points += len(item["points"])
                return True
        return False

    # ---------------------------------------------------------- sending
    def _next_batch(self) -> dict[str, Any] | None:
        """Up to max_batch points from the front, in order; a status or restart message
        closes the batch it ends."""
        with self._lock:
            if not self._items:
                return None
            batch: dict[str, Any] = {"points": []}
            taken = 0
            for item in self._items:
                if len(batch["points"]) + len(item.get("points", ())) > self.max_batch and taken:
                    break
                batch["points"] += item.get("points", [])
                taken += 1
                if len(item) > 1 or "points" not in item:
                    batch.update({k: v for k, v in item.items() if k != "points"})
                    break
            batch["_taken"] = taken
            return batch

    def _sent(self, taken: int) -> None:
        with self._lock:
            for _ in range(taken):
                item = self._items.popleft()
                self._buffered -= len(item.get("points", ()))

    def _post(self, body: dict[str, Any]) -> int:
        """The HTTP status; raises on connection errors and timeouts."""
        return self._http.post(self.url, json=body).status_code

    def _run(self) -> None:
        delay = self.flush_every
        while True:
            stopping = self._stop.is_set()
            while (batch := self._next_batch()) is not None:
                taken = batch.pop("_taken")
                try:
                    code = self._post(batch)
                except Exception as e:  # the service is away: keep the batch, back off
                    code, error = None, e
                if code is not None and code < 400:
                    self._sent(taken)
                    delay = self.flush_every
                elif code is not None and code < 500 and code not in self.RETRY:
                    self.rejected_batches += 1
                    log.warning(
                        "the service rejected a batch of %d points (HTTP %d); dropped",
                        len(batch["points"]),
                        code,
                    )
                    self._sent(taken)
                else:
                    if delay >= self.max_delay / 2:
                        log.warning("reporting to %s: %s; retrying", self.url, code or error)
                    delay = min(delay * 2, self.max_delay)
                    break
                if time.time() > self._deadline:
                    break
            if stopping and (self._next_batch() is None or time.time() > self._deadline):
                self._http.close()
                return
            self._stop.wait(delay)

    def close(self, timeout: float = 60.0) -> None:
        """Flush what is left, retrying for up to ``timeout`` seconds."""
        self._deadline = time.time() + timeout
        self._stop.set()
        self._thread.join(timeout + 5)
