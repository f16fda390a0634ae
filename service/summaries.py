"""Summaries of metric series at several resolutions, kept at ingest, so that a chart of any
window costs what it shows, not what the series holds.

Beside its raw points, every series (job, key) keeps, at each level i = 1..6, one row per
bucket of 32**i steps (aligned at multiples of the size): the bucket's smallest value and the
first step holding it, its largest value and the first step holding that (NULL points are
left out; a bucket with none is no row). A bucket is stored once it is *sealed*: its last
step is at or before the series' last step, so points arriving in step order cannot change
it. A read covers the open end of a series with sealed buckets of finer levels and, below 32
steps, raw points (``cover``): a window at a bucket width w touches at most 16 rows per
bucket shown plus 31 per level at each edge, however long the series is.

Appending only inserts rows, about one per 31 points. The series' row (``metric_series``)
keeps its last step and, per level, the extremes of what its open bucket holds so far
(``Open``), so a batch of points in step order needs one read (the series rows) and three
writes (the points, the sealed buckets, the series rows), whatever the levels it completes.

``reference`` is the readable definition (NumPy over every raw point); the tests hold the
stored rows to it after appends, re-sent and replaced points, and restarts. ``append`` is the
hot path; ``rebuild`` (points at or before the last step: a re-sent or replaced batch; the
migration) recomputes the buckets touched from the level below and forgets the open buckets
(read again from the database when next needed); ``truncate`` (a restart that discards
points after a step) drops what is no longer sealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from sqlalchemy.engine import Connection

BITS = 5  # a level's buckets are 32x its lower level's
LEVELS = range(1, 7)  # 32 ... 2**30 steps: a step id fits 31 bits


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
KEY_SHIFT = 40  # a piece's group in a batch of several series: (series << 40) | bucket
STEP_MASK = (1 << KEY_SHIFT) - 1
Span = tuple[int, str, int, int, int]  # (level, key, series index, first, last); 0: steps


def batch_order(series: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The indices that sort points by (series, step), keeping the last of repeated ones."""
    order = np.argsort(series, kind="stable")  # a reporter sends each series in step order
    s = steps[order]
    if not (s[1:] > s[:-1])[series[order][1:] == series[order][:-1]].all():
        order = np.lexsort((steps, series))  # stable: repeated points stay in arrival order
    k, s = series[order], steps[order]
    last = np.ones(len(order), bool)
    last[:-1] = (k[1:] != k[:-1]) | (s[1:] != s[:-1])
    return order[last]


class Open:
    """A series' open buckets, one per level: the extremes of what it holds so far (the
    points of the open bucket of level 1, the sealed buckets of the level below in the
    others), kept in the series' row so that a batch needs no read of them. A (levels, 4)
    array of (lo, lo_step, hi, hi_step), NaN where a bucket holds nothing yet; 192 bytes."""

    @staticmethod
    def encode(o: np.ndarray | None) -> bytes | None:
        return None if o is None else o.astype("<f8").tobytes()

    @staticmethod
    def decode(blob: bytes | None) -> np.ndarray | None:
        return None if blob is None else np.frombuffer(blob, "<f8").reshape(len(LEVELS), 4)

    @staticmethod
    def pieces(opens: np.ndarray, known: np.ndarray, after: np.ndarray, level: int) -> Pieces:
        """The known open buckets of ``level`` (``opens``: (series, levels, 4)) as pieces of
        the level below, grouped so that their parent is the open bucket: (i << 40) |
        (open bucket << BITS)."""
        a = opens[:, level - 1]
        i = np.flatnonzero(known & ~np.isnan(a[:, 0]))
        if not len(i):
            return Pieces.empty()
        a = a[i]
        bucket = (after[i] + 1) >> shift(level)
        return Pieces(
            (i << KEY_SHIFT) | (bucket << BITS),
            a[:, 0],
            a[:, 1].astype(np.int64),
            a[:, 2],
            a[:, 3].astype(np.int64),
        )


_PUT = "INSERT INTO metric_buckets (job_id, key, level, bucket, lo, lo_step, hi, hi_step)"
_REPLACE = (
    " ON CONFLICT (job_id, key, level, bucket) DO UPDATE SET lo = excluded.lo, "
    "lo_step = excluded.lo_step, hi = excluded.hi, hi_step = excluded.hi_step"
)
_PUT_ROWS = _PUT + " VALUES (?, ?, ?, ?, ?, ?, ?, ?)" + _REPLACE
_PUT_ARRAYS = (
    _PUT + " SELECT %s, k, l, b, lo, ls, hi, hs FROM unnest(%s::varchar[], %s::int[], "
    "%s::bigint[], %s::float8[], %s::int[], %s::float8[], %s::int[]) AS u(k, l, b, lo, ls, "
    "hi, hs)" + _REPLACE
)


class Store:
    """The summary tables of one job through one connection, in the driver's own SQL (the
    ingest path is hot: SQLAlchemy's per-statement work costs more than the database's)."""

    def __init__(self, conn: Connection, job_id: int) -> None:
        self.conn = conn
        self.job_id = job_id
        self.pg = conn.dialect.paramstyle != "qmark"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def query(self, sql: str, params: Sequence) -> list[tuple]:
        """Plain tuples from the driver's own cursor (SQLAlchemy's rows cost more to build
        and to turn into arrays than the database's work)."""
        cursor = self.conn.connection.cursor()
        try:
            cursor.execute(self._sql(sql), params)
            return cursor.fetchall()
        finally:
            cursor.close()

    def execute(self, sql: str, rows: list[Sequence]) -> None:
        """A statement for each of ``rows`` through the driver's cursor (SQLAlchemy's
        execution machinery costs more than inserting a few rows)."""
        cursor = self.conn.connection.cursor()
        try:
            cursor.executemany(self._sql(sql), rows)
        finally:
            cursor.close()

    # reads
    def lasts(self) -> dict[str, int]:
        """Each series' last step."""
        return {key: last for key, (last, _) in self.series().items()}

    def series(self) -> dict[str, tuple[int, np.ndarray | None]]:
        """Each series' last step and its open buckets (``Open``; None: not known)."""
        rows = self.query(
            "SELECT key, last_step, open FROM metric_series WHERE job_id = ?", (self.job_id,)
        )
        return {key: (last, Open.decode(blob)) for key, last, blob in rows}

    def last(self, key: str) -> int | None:
        rows = self.query(
            "SELECT last_step FROM metric_series WHERE job_id = ? AND key = ?",
            (self.job_id, key),
        )
        return rows[0][0] if rows else None

    def pieces(self, spans: Sequence[Span]) -> dict[int, Pieces]:
        """The stored pieces in several spans, in one statement (a UNION ALL of one index
        search each: SQLite cannot split an OR over a WITHOUT ROWID table): per level, raw
        points (level 0, NULLs left out) or buckets, grouped by (series << 40) | position."""
        if not spans:
            return {}
        raw = (
            "SELECT 0, ?, step, value, step, value, step FROM metrics "
            "WHERE job_id = ? AND key = ? AND step >= ? AND step <= ?"
        )
        stored = (
            "SELECT level, ?, bucket, lo, lo_step, hi, hi_step FROM metric_buckets "
            "WHERE job_id = ? AND key = ? AND level = ? AND bucket >= ? AND bucket <= ?"
        )
        sql, params = [], []
        for level, key, i, lo, hi in spans:
            sql.append(stored if level else raw)
            params += (
                (i, self.job_id, key, level, lo, hi) if level else (i, self.job_id, key, lo, hi)
            )
        rows = self.query(" UNION ALL ".join(sql), params)
        if not rows:
            return {}
        a = np.array(rows, np.float64)  # ids < 2**53: exact in a double; NULL -> NaN
        a = a[~np.isnan(a[:, 3])]
        i = a.astype(np.int64)
        every = Pieces((i[:, 1] << KEY_SHIFT) | i[:, 2], a[:, 3], i[:, 4], a[:, 5], i[:, 6])
        levels = i[:, 0]
        return {lv: every.take(levels == lv) for lv in set(levels.tolist())}

    def children(self, key: str, level: int, lo: int, hi: int) -> Pieces:
        """What buckets ``lo``..``hi`` of ``level`` are made of: raw points, or buckets."""
        got = self.pieces([(level - 1, key, 0, lo << BITS, ((hi + 1) << BITS) - 1)])
        return got.get(level - 1, Pieces.empty())

    # writes
    def put(self, names: Sequence[str], made: list[tuple[int, Pieces]]) -> None:
        """Insert (or replace) buckets: (level, pieces grouped by (series << 40) | bucket)."""
        made = [(level, p) for level, p in made if len(p.group)]
        if not made:
            return
        every = Pieces.concat([p for _, p in made])
        keys = [names[k] for k in (every.group >> KEY_SHIFT).tolist()]
        levels = [level for level, p in made for _ in range(len(p.group))]
        columns = [(every.group & STEP_MASK).tolist(), *every.columns()[1:]]
        if self.pg:
            self.execute(_PUT_ARRAYS, [(self.job_id, keys, levels, *columns)])
        else:
            self.execute(_PUT_ROWS, list(zip(repeat(self.job_id), keys, levels, *columns)))

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

    def set_lasts(self, lasts: Iterable[tuple[str, int, np.ndarray | None]]) -> None:
        """Each given series' last step and open buckets (None: not known)."""
        params = [(self.job_id, key, step, Open.encode(o)) for key, step, o in lasts]
        if params:
            self.execute(
                "INSERT INTO metric_series (job_id, key, last_step, open) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job_id, key) DO UPDATE SET last_step = excluded.last_step, "
                "open = excluded.open",
                params,
            )

    # the three ways a series changes
    def append(
        self,
        names: Sequence[str],
        after: np.ndarray,
        last: np.ndarray,
        batch: Pieces,
        opens: list[np.ndarray | None],
    ) -> tuple[list[tuple[int, Pieces]], list[np.ndarray]]:
        """The buckets that points after each series' last step seal. Per series i:
        ``after[i]`` its last step before them (-1: a new series), ``last[i]`` after them,
        ``opens[i]`` its open buckets before them (``Open``; None: read the pieces they
        hold from the database); ``batch`` holds the new non-NULL points (grouped by
        (i << 40) | step). Returns what ``put`` takes, and each series' open buckets after."""
        unknown = [i for i, o in enumerate(opens) if o is None]
        spans: list[Span] = []  # rare: the pieces of each open bucket, from the database
        for level in LEVELS if unknown else ():
            s = shift(level)
            for i in unknown:
                first = int(after[i] + 1) >> s  # the open bucket
                was = (int(after[i] + 1) >> (s - BITS)) - 1  # the level below's last sealed
                start = first << s if level == 1 else first << BITS
                if start <= was:
                    spans.append((level - 1, names[i], i, start, was))
        stored = self.pieces(spans)
        known = np.array([o is not None for o in opens])
        now = np.stack([np.full((len(LEVELS), 4), np.nan) if o is None else o for o in opens])
        made_at: list[tuple[int, Pieces]] = []
        below = batch  # the lower level's newly sealed pieces
        for level in LEVELS:
            s = shift(level)
            final = ((last + 1) >> s) - 1
            sealing = (final >= ((after + 1) >> s)).any()
            if not (sealing or len(below.group) or unknown):
                break  # nothing new at this level or above: their open buckets stay
            held = Open.pieces(now, known, after, level)  # before this level is updated
            parts = Pieces.concat([stored.get(level - 1, Pieces.empty()), held, below])
            series = parts.group >> KEY_SHIFT
            parent = (parts.group & STEP_MASK) >> BITS
            keep = parent <= final[series]
            made = parts.take(keep).aggregate((series[keep] << KEY_SHIFT) | parent[keep])
            if sealing:
                made_at.append((level, made))
            rest = parts.take(~keep).aggregate(series[~keep])  # each series' open bucket
            now[:, level - 1] = np.nan  # nothing in it yet, but where rest says
            now[rest.group, level - 1] = np.stack([rest.lo, rest.lo_step, rest.hi, rest.hi_step], 1)
            below = made
        return made_at, list(now)

    def rebuild(self, key: str, lo: int, hi: int, last: int) -> None:
        """Recompute every sealed bucket (of a series whose last step is ``last``) that
        holds a step in ``lo``..``hi``, level by level from the one below."""
        for level in LEVELS:
            s = shift(level)
            b_lo, b_hi = lo >> s, min(hi >> s, ((last + 1) >> s) - 1)
            if b_hi < b_lo:
                break
            parts = self.children(key, level, b_lo, b_hi)
            self.drop(key, level, b_lo, b_hi)
            self.put([key], [(level, parts.aggregate(parts.group >> BITS))])
        self.set_lasts([(key, last, None)])  # its open buckets may have changed too

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
                self.set_lasts([(key, now, None)])


def record(
    store: Store,
    names: Sequence[str],
    series: np.ndarray,
    steps: np.ndarray,
    values: np.ndarray,
    known: dict[str, tuple[int, np.ndarray | None]] | None = None,
) -> None:
    """Keep the summaries of ``store``'s job exact after points were upserted into
    ``metrics``, in the same transaction: point j is step ``steps[j]`` of series
    ``names[series[j]]`` with value ``values[j]`` (NaN for NULL), sorted by (series, step)
    without repeats (``batch_order``). ``known``: ``store.series()`` if the caller read it
    already (under the job's lock). Three statements for points after each series' last
    step (the series rows, the new buckets, the series rows again); a rebuild of the
    buckets they touch for points at or before it (re-sent or replaced)."""
    if known is None:
        known = store.series()
    after = np.array([known.get(name, (-1, None))[0] for name in names], np.int64)
    old = steps <= after[series]
    if old.any():  # rare
        for i in np.unique(series[old]).tolist():
            at = steps[old & (series == i)]
            store.rebuild(names[i], int(at[0]), int(at[-1]), int(after[i]))
        known = store.series()  # their open buckets are read again below
    opens = [
        known[name][1] if name in known else np.full((len(LEVELS), 4), np.nan) for name in names
    ]
    ends = np.flatnonzero(np.append(series[1:] != series[:-1], True))  # each one's last point
    last = after.copy()
    last[series[ends]] = np.maximum(after[series[ends]], steps[ends])
    new = ~old & ~np.isnan(values)
    k, s, v = series[new], steps[new], values[new]
    batch = Pieces((k << KEY_SHIFT) | s, v, s, v, s)
    made, opens = store.append(names, after, last, batch, opens)
    store.put(names, made)
    store.set_lasts(zip(names, last.tolist(), opens, strict=True))
