"""Live job streams: one poller per watched job, shared by every viewer of that job.

A viewer's stream sends the job's status events and its metric points after the viewer's
cursor, then ends when the job has ended and everything was sent. The database is read off
the event loop (in a worker thread) once per poll interval per watched job, however many
viewers it has; each new chunk of points is serialised once and the same bytes go to every
viewer. A viewer that joins late, or falls behind the chunks kept in memory, catches up
from the database at its own cursor with short reads of its own. No viewer holds a pooled
connection between reads.

Every message carries an ``id:`` (the cursor: last status event id and last metric row id,
``"E.M"``), so a client that reconnects with ``Last-Event-ID`` resumes where it stopped.
Metric row ids grow in commit order per job: ingest locks the job's row first, and SQLite's
metrics table uses AUTOINCREMENT, so ids freed by a restart's delete are never reused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from fastapi import HTTPException, status
from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse

from .models import TERMINAL, Event, Job, Metric, MetricSeries

log = logging.getLogger("nestor.streams")

READ_LIMIT = 5_000  # rows per database read (and per message): short reads, small buffers
KEEP_CHUNKS = 16  # chunks kept for viewers that are a little behind
KEEP_HISTORY = 32  # history reads kept for viewers catching up in step


@dataclass(frozen=True)
class Cursor:
    """What a viewer has been sent: the last status event id and the last metric row id."""

    event: int = 0
    metric: int = 0

    def __str__(self) -> str:
        return f"{self.event}.{self.metric}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        """A ``Last-Event-ID`` value, or None if it is not one of ours."""
        try:
            event, metric = (text or "").split(".")
            cursor = cls(int(event), int(metric))
        except ValueError:
            return None
        return cursor if cursor.event >= 0 and cursor.metric >= 0 else None


def frame(event: str, cursor: Cursor, data: bytes) -> bytes:
    """One server-sent event; ``data`` is a single line of JSON."""
    return b"event: %s\nid: %s\ndata: %s\n\n" % (event.encode(), str(cursor).encode(), data)


_KEYS: dict[str, str] = {}  # a metric key -> its JSON string (a job has a few dozen keys)


def points_json(rows: list[Any]) -> bytes:
    """``[{"step": s, "key": k, "value": v}, ...]`` of (id, step, key, value) rows, written
    with string formatting: no dict per point (this runs for every point a live job sends,
    and container objects are what make Python's garbage collector pause the server)."""
    parts = []
    for _, step, key, value in rows:
        quoted = _KEYS.get(key)
        if quoted is None:
            quoted = json.dumps(key)
            if len(_KEYS) < 10_000:
                _KEYS[key] = quoted
        # repr() of a finite float is a JSON number; stored values are finite or null.
        number = "null" if value is None else repr(float(value))
        parts.append(f'{{"step": {int(step)}, "key": {quoted}, "value": {number}}}')
    return ("[" + ", ".join(parts) + "]").encode()


# ------------------------------------------------------------------ database reads
def read_metrics(
    db: Session, job_id: int, after: int, upto: int | None, since_step: int, limit: int
) -> list[tuple]:
    """Rows (id, step, key, value) with after < id <= upto and step > since_step, by id.

    The hot read of every live stream: through the driver's own cursor, because SQLAlchemy's
    result rows cost more than the database's work (5,000 rows: ~15 ms against ~4 ms)."""
    conn = db.connection()
    p = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = f"SELECT id, step, key, value FROM metrics WHERE job_id = {p} AND id > {p}"
    params: list[int] = [job_id, after]
    if upto is not None:
        sql += f" AND id <= {p}"
        params.append(upto)
    if since_step:
        sql += f" AND step > {p}"
        params.append(since_step)
    cursor = conn.connection.cursor()
    try:
        cursor.execute(f"{sql} ORDER BY id LIMIT {int(limit)}", params)
        return cursor.fetchall()
    finally:
        cursor.close()


def _read_json(db: Session, *, job_id: int, after: int, upto: int, since_step: int) -> bytes | None:
    rows = read_metrics(db, job_id, after, upto, since_step, READ_LIMIT)
    return points_json(rows) if rows else None


def read_events(db: Session, job_id: int, after: int) -> list[dict[str, Any]]:
    rows = db.scalars(
        select(Event).where(Event.job_id == job_id, Event.id > after).order_by(Event.id)
    )
    return [
        {"id": e.id, "status": e.status, "reason": e.reason, "time": e.time.isoformat()}
        for e in rows
    ]


def start_cursor(db: Session, job_id: int, since_step: int) -> Cursor:
    """Where a new viewer starts: before the first point after ``since_step`` (or after the
    newest point when there is none yet); every status event is sent."""
    if not since_step:
        return Cursor()
    last = db.scalar(select(Job.last_step).where(Job.id == job_id)) or 0
    if since_step < last / 2:  # few rows before it: scan in id order up to the first after
        first = db.scalar(
            select(func.min(Metric.id)).where(Metric.job_id == job_id, Metric.step > since_step)
        )
    else:  # few rows after it: each series' points after it, by (job, key, step)
        keys = db.scalars(select(MetricSeries.key).where(MetricSeries.job_id == job_id)).all()
        firsts = [
            select(func.min(Metric.id).label("id")).where(
                Metric.job_id == job_id, Metric.key == key, Metric.step > since_step
            )
            for key in keys
        ]
        first = db.scalar(select(func.min(union_all(*firsts).subquery().c.id))) if keys else None
    if first is not None:
        return Cursor(0, first - 1)
    newest = db.scalar(select(func.max(Metric.id)).where(Metric.job_id == job_id))
    return Cursor(0, newest or 0)


# ------------------------------------------------------------------ the shared feed
@dataclass
class Chunk:
    """Metric rows with ids in (after, upto], serialised once for every viewer."""

    after: int
    upto: int
    min_step: int
    data: bytes


@dataclass
class Feed:
    """What one poller knows about one job; viewers read it and wait for changes."""

    job_id: int
    viewers: int = 0
    ready: bool = False
    base: int = 0  # chunks cover metric ids in (base, upto]
    upto: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    chunks: deque[Chunk] = field(default_factory=lambda: deque(maxlen=KEEP_CHUNKS))
    ended: bool = False
    missing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    # Reads of the history before ``base``, shared by the viewers that need the same one
    # (a page opened by many at once): (after, since_step) -> (next cursor, message data).
    history: OrderedDict[tuple[int, int], asyncio.Task] = field(default_factory=OrderedDict)

    def publish(self) -> None:
        """Wake every waiting viewer; they re-read the feed."""
        self.changed.set()
        self.changed = asyncio.Event()

    def add(self, chunk: Chunk) -> None:
        if len(self.chunks) == self.chunks.maxlen:
            self.base = self.chunks[0].upto  # the oldest chunk is about to be dropped
        self.chunks.append(chunk)
        self.upto = chunk.upto


class StreamHub:
    """The feeds of the jobs being watched in this process, and the open streams per token."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        *,
        poll_interval: float = 0.5,
        max_per_token: int = 32,
    ) -> None:
        self.sessions = sessions
        self.poll_interval = poll_interval
        self.max_per_token = max_per_token
        self.feeds: dict[int, Feed] = {}
        self.open_per_token: dict[int, int] = {}

    async def db(self, fn: Callable[[Session], Any]) -> Any:
        """Run ``fn(session)`` in a worker thread with a session of its own."""

        def run() -> Any:
            with self.sessions() as s:
                return fn(s)

        return await anyio.to_thread.run_sync(run)

    # --------------------------------------------------------- per-token limit
    def open_or_refuse(self, token_id: int) -> Callable[[], None]:
        """``open``, or an HTTP 429 naming the limit."""
        release = self.open(token_id)
        if release is None:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"this token already has {self.max_per_token} live streams open (the limit, "
                "NESTOR_MAX_STREAMS_PER_TOKEN); close a job page or use another token",
                headers={"Retry-After": "5"},
            )
        return release

    def open(self, token_id: int) -> Callable[[], None] | None:
        """Count one more stream for ``token_id``: the release function, or None if the
        token is at its limit."""
        if self.open_per_token.get(token_id, 0) >= self.max_per_token:
            return None
        self.open_per_token[token_id] = self.open_per_token.get(token_id, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open_per_token[token_id] -= 1

        return release

    # --------------------------------------------------------- feeds
    def _subscribe(self, job_id: int) -> Feed:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id)
            feed.task = asyncio.get_running_loop().create_task(self._poll(feed))
        feed.viewers += 1
        return feed

    def _unsubscribe(self, feed: Feed) -> None:
        feed.viewers -= 1
        if feed.viewers == 0 and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
            if feed.task is not None:
                feed.task.cancel()

    async def _poll(self, feed: Feed) -> None:
        """Read the job's new events and points until it has ended and nothing is left."""
        job_id = feed.job_id

        def first(db: Session) -> tuple[int, list[dict[str, Any]]]:
            newest = db.scalar(select(func.max(Metric.id)).where(Metric.job_id == job_id))
            return newest or 0, read_events(db, job_id, 0)

        def poll(db: Session) -> tuple[str | None, list[dict[str, Any]], Chunk | None, int]:
            # Status first: rows committed before the job ended are visible to the next read.
            status = db.scalar(select(Job.status).where(Job.id == job_id))
            after_event = feed.events[-1]["id"] if feed.events else 0
            rows = read_metrics(db, job_id, feed.upto, None, 0, READ_LIMIT)
            chunk = None
            if rows:  # serialised here, off the event loop
                chunk = Chunk(feed.upto, rows[-1][0], min(r[1] for r in rows), points_json(rows))
            return status, read_events(db, job_id, after_event), chunk, len(rows)

        try:
            feed.base, feed.events = await self.db(first)
            feed.upto = feed.base
            feed.ready = True
            feed.publish()
            while True:
                status, events, chunk, count = await self.db(poll)
                feed.events += events
                if events:  # a restart may have deleted points: history reads are stale
                    feed.history.clear()
                if chunk is not None:
                    feed.add(chunk)
                if status is None or (status in TERMINAL and not chunk and not events):
                    feed.missing, feed.ended = status is None, True
                if events or chunk or feed.ended:
                    feed.publish()
                if feed.ended:
                    return
                if count < READ_LIMIT:
                    await asyncio.sleep(self.poll_interval)
        except asyncio.CancelledError:
            raise
        except Exception:  # the database is away: viewers end, clients reconnect
            log.exception("polling job %s for live viewers failed", job_id)
            feed.ended = feed.missing = True
            feed.publish()
            if self.feeds.get(job_id) is feed:
                del self.feeds[job_id]

    # --------------------------------------------------------- one viewer
    def _history(self, feed: Feed, after: int, since_step: int) -> asyncio.Task:
        """The read of the points after ``after`` (up to the chunks in memory), started by
        the first viewer that needs it and awaited by every other one."""
        key = (after, since_step)
        task = feed.history.get(key)
        if task is None:
            upto = feed.base

            def read(db: Session) -> tuple[int, bytes | None]:
                rows = read_metrics(db, feed.job_id, after, upto, since_step, READ_LIMIT)
                done = rows[-1][0] if len(rows) == READ_LIMIT else upto
                return done, points_json(rows) if rows else None  # off the event loop

            task = feed.history[key] = asyncio.get_running_loop().create_task(self.db(read))

            def forget_failure(done: asyncio.Task) -> None:  # the next viewer tries again
                if (done.cancelled() or done.exception()) and feed.history.get(key) is done:
                    del feed.history[key]

            task.add_done_callback(forget_failure)
            while len(feed.history) > KEEP_HISTORY:
                feed.history.popitem(last=False)
        return task

    async def stream(self, job_id: int, cursor: Cursor, since_step: int) -> AsyncIterator[bytes]:
        """One viewer's messages: status events and metric points after ``cursor``, then
        ``end`` once the job has ended and everything was sent."""
        feed = self._subscribe(job_id)
        try:
            while True:
                changed = feed.changed
                if not feed.ready:
                    await changed.wait()
                    continue
                for ev in [e for e in feed.events if e["id"] > cursor.event]:
                    cursor = Cursor(ev["id"], cursor.metric)
                    data = {k: ev[k] for k in ("status", "reason", "time")}
                    yield frame("status", cursor, json.dumps(data).encode())
                if cursor.metric < feed.base:  # behind the chunks in memory: catch up
                    done, data = await asyncio.shield(
                        self._history(feed, cursor.metric, since_step)
                    )
                    cursor = Cursor(cursor.event, done)
                    if data is not None:
                        yield frame("metrics", cursor, data)
                    continue
                for chunk in list(feed.chunks):
                    if chunk.upto <= cursor.metric:
                        continue
                    cursor = Cursor(cursor.event, chunk.upto)
                    if since_step < chunk.min_step:
                        yield frame("metrics", cursor, chunk.data)
                    else:  # a viewer that asked for later steps only: filter this chunk
                        data = await self.db(
                            partial(
                                _read_json,
                                job_id=job_id,
                                after=chunk.after,
                                upto=chunk.upto,
                                since_step=since_step,
                            )
                        )
                        if data is not None:
                            yield frame("metrics", cursor, data)
                if feed.ended and cursor.metric >= feed.upto:
                    if not feed.missing:
                        yield frame("end", cursor, b"{}")
                    return
                if feed.changed is changed:
                    await changed.wait()
        finally:
            self._unsubscribe(feed)


class StreamResponse(EventSourceResponse):
    """sse-starlette's response (keep-alive comments, disconnects, server shutdown, send
    timeouts), releasing the viewer's slot however the stream ends, even unstarted."""

    def __init__(self, content: Any, release: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
