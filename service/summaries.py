"""Summaries of metric series at several resolutions, kept at ingest, so that a chart of any
window costs what it shows, not what the series holds.

Beside its raw points, every series (job, key) keeps, at each level i = 1..7, one row per
bucket of 16**i steps (aligned at multiples of the size): the bucket's smallest value and the
first step holding it, its largest value and the first step holding that (NULL points are
left out; a bucket with none stored is no row). A bucket is stored once it is *sealed*: its
last step is at or before the series' last step, so points arriving in step order cannot
change it. The open buckets at the end of a series are never stored: a read covers them
with sealed buckets of finer levels and, below 16 steps, raw points (``cover``). So appending
only ever inserts rows (about one per 15 points), and a read of a window at a bucket width w
touches fewer than 8 rows per bucket shown plus at most 15 per level at each edge, however
long the series is.

``reference`` is the readable definition (NumPy over every raw point); the tests hold the
stored rows to it after appends, re-sent and replaced points, and restarts. ``append``
(points after the series' last step, the hot path) computes the new rows from the batch in
memory plus the at most 15 older rows of each level it completes; ``rebuild`` (points at or
before the last step: a re-sent or replaced batch; the migration) recomputes the buckets
touched from the level below; ``truncate`` (a restart that discards points after a step)
drops what is no longer sealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.engine import Connection

BITS = 4  # a level's buckets are 16x its lower level's
LEVELS = range(1, 8)  # 16 ... 268M steps: a step id fits 31 bits


def shift(level: int) -> int:
    return BITS * level


# ------------------------------------------------------------------ pure arithmetic
@dataclass
class Pieces:
    """Parts of a series in step order, each with its extremes: raw points (one step each)
    or stored buckets. ``group`` is what they are aggregated by (a bucket id)."""

    group: np.ndarray  # int64
    lo: np.ndarray  # float64
    lo_step: np.ndarray  # int64
    hi: np.ndarray
    hi_step: np.ndarray

    @classmethod
    def empty(cls) -> Pieces:
        z, f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return cls(z, f, z, f, z)

    @classmethod
    def points(cls, steps: np.ndarray, values: np.ndarray) -> Pieces:
        """Raw points (NaN = a NULL point, left out)."""
        keep = ~np.isnan(values)
        s, v = steps[keep].astype(np.int64), values[keep].astype(np.float64)
        return cls(s, v, s, v, s)

    @classmethod
    def concat(cls, parts: Sequence[Pieces]) -> Pieces:
        parts = [p for p in parts if len(p.group)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls._fields()))

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("group", "lo", "lo_step", "hi", "hi_step")

    def take(self, mask: np.ndarray) -> Pieces:
        return Pieces(*(getattr(self, f)[mask] for f in self._fields()))

    def aggregate(self, parent: np.ndarray) -> Pieces:
        """One piece per distinct ``parent`` (ascending): the smallest value and the first
        step holding it, the largest and the first step holding it."""
        if not len(parent):
            return Pieces.empty()
        by_lo = np.lexsort((self.lo_step, self.lo, parent))
        by_hi = np.lexsort((self.hi_step, -self.hi, parent))
        first = np.ones(len(parent), bool)
        first[1:] = parent[by_lo][1:] != parent[by_lo][:-1]  # same groups in both orders
        lo_i, hi_i = by_lo[first], by_hi[first]
        return Pieces(
            parent[lo_i], self.lo[lo_i], self.lo_step[lo_i], self.hi[hi_i], self.hi_step[hi_i]
        )

    def columns(self) -> list[list]:
        """Each field as a Python list (what the drivers take)."""
        return [getattr(self, f).tolist() for f in self._fields()]


def sealed_between(level: int, after: int | None, last: int) -> tuple[int, int]:
    """The buckets of ``level`` that become sealed when a series' last step moves from
    ``after`` (None: a new series) to ``last``: those whose last step lies in (after, last].
    Empty when the first exceeds the second."""
    s = shift(level)
    first = 0 if after is None else (after + 1) >> s
    return first, ((last + 1) >> s) - 1


def cover(first: int, last: int, top: int) -> list[tuple[int, int, int]]:
    """Steps ``first``..``last`` of a series whose last step is ``last``, as ranges of sealed
    buckets of levels <= ``top`` (the largest that fit) and of raw steps (level 0), in step
    order: ``(level, from, to)`` with bucket ids (or steps, for level 0) inclusive."""
    out: list[tuple[int, int, int]] = []

    def split(lo: int, hi: int, level: int) -> None:
        if lo > hi:
            return
        if level == 0:
            out.append((0, lo, hi))
            return
        s = shift(level)
        b_lo, b_hi = -(-lo >> s), ((hi + 1) >> s) - 1
        if b_hi < b_lo:
            split(lo, hi, level - 1)
            return
        split(lo, (b_lo << s) - 1, level - 1)
        out.append((level, b_lo, b_hi))
        split((b_hi + 1) << s, hi, level - 1)

    split(first, last, top)
    return out


def reference(steps: np.ndarray, values: np.ndarray) -> dict[int, Pieces]:
    """The definition: for each level, the sealed buckets of the whole series (steps
    ascending, NaN for NULL), straight from the raw points."""
    if not len(steps):
        return {}
    last = int(steps[-1])
    points = Pieces.points(steps, values)
    out = {}
    for level in LEVELS:
        s = shift(level)
        done = points.take((points.group >> s) <= ((last + 1) >> s) - 1)
        out[level] = done.aggregate(done.group >> s)
    return out


# ------------------------------------------------------------------ the database
class Store:
    """The summary tables through one connection, in the driver's own SQL (the ingest path
    is hot: SQLAlchemy's per-statement work costs more than the database's)."""

    def __init__(self, conn: Connection, job_id: int) -> None:
        self.conn = conn
        self.job_id = job_id
        self.pg = conn.dialect.paramstyle != "qmark"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def query(self, sql: str, params: tuple) -> list[tuple]:
        return self.conn.exec_driver_sql(self._sql(sql), params).fetchall()

    # reads
    def lasts(self) -> dict[str, int]:
        """Each series' last step."""
        rows = self.query(
            "SELECT key, last_step FROM metric_series WHERE job_id = ?", (self.job_id,)
        )
        return dict(rows)

    def last(self, key: str) -> int | None:
        rows = self.query(
            "SELECT last_step FROM metric_series WHERE job_id = ? AND key = ?",
            (self.job_id, key),
        )
        return rows[0][0] if rows else None

    def raw(self, key: str, lo: int, hi: int) -> Pieces:
        rows = self.query(
            "SELECT step, value FROM metrics WHERE job_id = ? AND key = ? AND step >= ? "
            "AND step <= ? AND value IS NOT NULL ORDER BY step",
            (self.job_id, key, lo, hi),
        )
        if not rows:
            return Pieces.empty()
        a = np.array(rows, dtype=np.float64)
        s = a[:, 0].astype(np.int64)
        return Pieces(s, a[:, 1], s, a[:, 1], s)

    def buckets(self, key: str, level: int, lo: int, hi: int) -> Pieces:
        rows = self.query(
            "SELECT bucket, lo, lo_step, hi, hi_step FROM metric_buckets WHERE job_id = ? "
            "AND key = ? AND level = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket",
            (self.job_id, key, level, lo, hi),
        )
        if not rows:
            return Pieces.empty()
        a = np.array(rows, dtype=np.float64)  # ids < 2**53: exact in a double
        return Pieces(
            a[:, 0].astype(np.int64), a[:, 1], a[:, 2].astype(np.int64), a[:, 3],
            a[:, 4].astype(np.int64),
        )  # fmt: skip

    def children(self, key: str, level: int, lo: int, hi: int) -> Pieces:
        """What buckets ``lo``..``hi`` of ``level`` are made of: raw points, or buckets."""
        s_lo, s_hi = lo << BITS, ((hi + 1) << BITS) - 1
        if level == 1:
            return self.raw(key, s_lo, s_hi)
        return self.buckets(key, level - 1, s_lo, s_hi)

    # writes
    def put(self, rows: list[tuple[str, int, Pieces]]) -> None:
        """Insert (or replace) buckets: (key, level, pieces) with the bucket ids in group."""
        rows = [r for r in rows if len(r[2].group)]
        if not rows:
            return
        conflict = (
            " ON CONFLICT (job_id, key, level, bucket) DO UPDATE SET lo = excluded.lo, "
            "lo_step = excluded.lo_step, hi = excluded.hi, hi_step = excluded.hi_step"
        )
        columns = (
            "INSERT INTO metric_buckets (job_id, key, level, bucket, lo, lo_step, hi, hi_step)"
        )
        if self.pg:
            keys = [k for k, _, p in rows for _ in range(len(p.group))]
            levels = [lv for _, lv, p in rows for _ in range(len(p.group))]
            arrays = (keys, levels, *Pieces.concat([p for _, _, p in rows]).columns())
            self.conn.exec_driver_sql(
                columns + " SELECT %s, k, l, b, lo, ls, hi, hs FROM unnest(%s::varchar[], "
                "%s::int[], %s::bigint[], %s::float8[], %s::int[], %s::float8[], %s::int[]) "
                "AS u(k, l, b, lo, ls, hi, hs)" + conflict,
                (self.job_id, *arrays),
            )
            return
        params = [
            (self.job_id, key, level, b, lo, ls, hi, hs)
            for key, level, p in rows
            for b, lo, ls, hi, hs in zip(*p.columns(), strict=True)
        ]
        self.conn.exec_driver_sql(columns + " VALUES (?, ?, ?, ?, ?, ?, ?, ?)" + conflict, params)

    def drop(self, key: str, level: int, lo: int, hi: int | None = None) -> None:
        """Delete the buckets ``lo``..``hi`` (to the end when None) of one level."""
        upto = "" if hi is None else " AND bucket <= ?"
        self.conn.exec_driver_sql(
            self._sql(
                "DELETE FROM metric_buckets WHERE job_id = ? AND key = ? AND level = ? "
                "AND bucket >= ?" + upto
            ),
            (self.job_id, key, level, lo) + (() if hi is None else (hi,)),
        )

    def set_lasts(self, lasts: Iterable[tuple[str, int]]) -> None:
        params = [(self.job_id, key, step) for key, step in lasts]
        if params:
            self.conn.exec_driver_sql(
                self._sql(
                    "INSERT INTO metric_series (job_id, key, last_step) VALUES (?, ?, ?) "
                    "ON CONFLICT (job_id, key) DO UPDATE SET last_step = excluded.last_step"
                ),
                params,
            )

    # the three ways a series changes
    def append(self, key: str, after: int | None, batch: Pieces, last: int) -> list:
        """The buckets sealed by points after ``after`` (the series' last step before this
        batch; None for a new series) up to ``last``: ``batch`` holds those points (NULLs
        left out), older ones come from the database. Returns rows for ``put``."""
        out = []
        below = batch  # the lower level's pieces for this stretch, in step order
        for level in LEVELS:
            first, final = sealed_between(level, after, last)
            if final < first:
                break
            s = shift(level)
            # Lower-level pieces sealed before this batch that share a newly sealed bucket.
            older = Pieces.empty()
            if after is not None and (first << s) <= after:
                if level == 1:
                    older = self.raw(key, first << s, after)
                else:
                    was = ((after + 1) >> (s - BITS)) - 1  # the lower level's last sealed
                    older = self.buckets(key, level - 1, first << BITS, was)
            parts = Pieces.concat([older, below])
            parts = parts.take((parts.group >> BITS) <= final)
            made = parts.aggregate(parts.group >> BITS)
            out.append((key, level, made))
            below = made
        return out

    def rebuild(self, key: str, lo: int, hi: int, last: int) -> None:
        """Recompute every sealed bucket (of a series whose last step is ``last``) that
        holds a step in ``lo``..``hi``, level by level from the one below."""
        for level in LEVELS:
            s = shift(level)
            b_lo, b_hi = lo >> s, min(hi >> s, ((last + 1) >> s) - 1)
            if b_hi < b_lo:
                break
            parts = self.children(key, level, b_lo, b_hi)
            made = parts.aggregate(parts.group >> BITS)
            self.drop(key, level, b_lo, b_hi)
            self.put([(key, level, made)])

    def truncate(self, after: int) -> None:
        """Points after ``after`` were deleted: each series' new last step, and no bucket
        that is no longer sealed."""
        for key, last in self.lasts().items():
            if last <= after:
                continue
            rows = self.query(
                "SELECT max(step) FROM metrics WHERE job_id = ? AND key = ?", (self.job_id, key)
            )
            now = rows[0][0]
            for level in LEVELS:
                self.drop(key, level, 0 if now is None else (now + 1) >> shift(level))
            if now is None:
                self.conn.exec_driver_sql(
                    self._sql("DELETE FROM metric_series WHERE job_id = ? AND key = ?"),
                    (self.job_id, key),
                )
            else:
                self.set_lasts([(key, now)])


def record(conn: Connection, job_id: int, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Keep the summaries of ``job_id`` exact after its points ``series`` (per key: steps
    ascending and distinct, values with NaN for NULL) were upserted into ``metrics``."""
    store = Store(conn, job_id)
    lasts = store.lasts()
    rows: list = []
    moved: list[tuple[str, int]] = []
    for key, (steps, values) in series.items():
        before = lasts.get(key)
        last = int(steps[-1]) if before is None else max(before, int(steps[-1]))
        fresh = 0
        if before is not None and steps[0] <= before:  # re-sent or replaced points
            fresh = int(np.searchsorted(steps, before, side="right"))
            store.rebuild(key, int(steps[0]), int(steps[fresh - 1]), before)
        if fresh < len(steps):
            new = Pieces.points(steps[fresh:], values[fresh:])
            rows += store.append(key, before, new, last)
        if last != before:
            moved.append((key, last))
    store.put(rows)
    store.set_lasts(moved)
