"""Metric summaries: the stored buckets equal the NumPy definition after every way a series
changes (appends, re-sent and replaced points, restarts, the migration), on SQLite and
PostgreSQL; reads from them equal the downsampling reference and touch a bounded number of
rows however long the series."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import create_engine, select, text

from service.db import Database, upgrade
from service.downsample import min_max_downsample, query_series
from service.jobs import create_job, ingest, store_points
from service.models import Job, MetricBucket, MetricSeries
from service.schemas import MetricBatch
from service.summaries import BITS, LEVELS, Store, cover, reference

from .test_api import SPEC


@pytest.fixture
def db(db_url):
    upgrade(db_url)
    database = Database(db_url)
    yield database
    database.engine.dispose()


def new_job(db) -> int:
    with db.sessions() as s:
        return create_job(s, "summaries", SPEC, 0).id


def store(db, job_id: int, steps, values, key: str = "loss") -> None:
    with db.sessions() as s:
        s.get(Job, job_id, with_for_update=True)  # ingest's order
        rows = [
            (int(st), key, None if np.isnan(v) else float(v), 0.0)
            for st, v in zip(steps, values, strict=True)
        ]
        store_points(s, job_id, rows)
        s.commit()


def stored(db, job_id: int, key: str = "loss") -> dict[int, list[tuple]]:
    with db.sessions() as s:
        rows = s.execute(
            select(MetricBucket)
            .where(MetricBucket.job_id == job_id, MetricBucket.key == key)
            .order_by(MetricBucket.level, MetricBucket.bucket)
        ).scalars()
        out: dict[int, list[tuple]] = {}
        for r in rows:
            out.setdefault(r.level, []).append((r.bucket, r.lo, r.lo_step, r.hi, r.hi_step))
        return out


def expected(steps: np.ndarray, values: np.ndarray) -> dict[int, list[tuple]]:
    out = {}
    for level, p in reference(steps, values).items():
        if len(p.group):
            out[level] = list(zip(*p.columns(), strict=True))
    return out


def series_of(truth: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array(sorted(truth), dtype=np.int64)
    return steps, np.array([truth[s] for s in steps], dtype=np.float64)


def test_cover_is_exact_ordered_and_sealed():
    rng = np.random.default_rng(0)
    for _ in range(500):
        first = int(rng.integers(0, 10**6))
        last = first + int(rng.integers(0, 10**7))
        top = int(rng.integers(0, 8))
        ranges = cover(first, last, top)
        at = first
        for level, lo, hi in ranges:
            assert 0 <= level <= top and lo <= hi
            s = BITS * level
            assert lo << s == at  # contiguous, in step order
            at = (hi + 1) << s
        assert at == last + 1  # every step once; a bucket ends at or before the last step
        assert sum(level == 0 for level, _, _ in ranges) <= 2  # raw only at the two edges
        assert len(ranges) <= 2 * top + 1


def test_summaries_stay_exact_through_appends_resends_replacements_and_restarts(db):
    """A series built as a job's reporter sends it (batches in step order with gaps and
    NULLs), then re-sent batches (same and changed values), points out of order, restarts
    that discard what follows a step, and more appends: after each, the stored buckets of
    every level equal the definition computed from all points."""
    job_id = new_job(db)
    rng = np.random.default_rng(7)
    truth: dict[int, float] = {}
    step = 0

    def check():
        assert stored(db, job_id) == expected(*series_of(truth))
        with db.sessions() as s:
            assert Store(s.connection(), job_id).last("loss") == max(truth)

    for round_ in range(6):
        for _ in range(int(rng.integers(3, 8))):  # appends
            n = int(rng.integers(1, 700))
            steps = step + np.cumsum(rng.integers(1, 4, size=n))
            values = np.round(rng.normal(size=n), 1)  # ties are common
            values[rng.random(n) < 0.05] = np.nan
            store(db, job_id, steps, values)
            truth.update(zip(steps.tolist(), values.tolist(), strict=True))
            step = int(steps[-1])
        check()
        old = np.array(sorted(truth))[-int(rng.integers(50, 2000)) :]  # re-sent
        changed = np.where(rng.random(len(old)) < 0.5, rng.normal(size=len(old)) * 5, np.nan)
        keep = np.array([truth[s] for s in old.tolist()])
        values = np.where(np.isnan(changed), keep, changed)
        mixed = rng.permutation(len(old))  # in any order, and past the end too
        more = step + np.arange(1, 40)
        steps = np.concatenate([old[mixed], more])
        values = np.concatenate([values[mixed], rng.normal(size=len(more))])
        store(db, job_id, steps, values)
        truth.update(zip(steps.tolist(), values.tolist(), strict=True))
        step = max(truth)
        check()
        if round_ % 2:  # a restart from a checkpoint: what follows it comes again
            resume = int(rng.choice(sorted(truth)[-3000:]))
            with db.sessions() as s:
                ingest(s, job_id, MetricBatch(points=[], resume_from_step=resume))
            truth = {k: v for k, v in truth.items() if k <= resume}
            step = resume
            check()


def test_a_restart_before_every_point_forgets_the_series(db):
    job_id = new_job(db)
    store(db, job_id, np.arange(5, 5000), np.ones(4995))
    with db.sessions() as s:
        ingest(s, job_id, MetricBatch(points=[], resume_from_step=2))
        assert Store(s.connection(), job_id).lasts() == {}
    assert stored(db, job_id) == {}


def test_reads_equal_the_reference_for_every_window(db):
    """query_series (stored buckets at the edges and in the middle, raw points below 16
    steps) against min_max_downsample of the same window, across widths that use every
    level up to 32**3 = 32,768 steps."""
    job_id = new_job(db)
    rng = np.random.default_rng(3)
    steps = np.cumsum(rng.integers(1, 3, size=300_000))
    values = np.round(rng.normal(size=len(steps)), 2)
    values[rng.random(len(steps)) < 0.01] = np.nan
    values[123_456] = 1e6  # a spike
    for i in range(0, len(steps), 50_000):
        store(db, job_id, steps[i : i + 50_000], values[i : i + 50_000])
    with db.sessions() as s:
        for since in (0, 1, 17, 4095, 65_537, 333_333, int(steps[-1000])):
            window = steps > since
            for max_points in (2, 5, 64, 1000, 2000, 40_000):
                want = min_max_downsample(steps[window], values[window], max_points)
                got = query_series(s, job_id, "loss", max_points, since)
                assert got[0] == want[0].tolist(), (since, max_points)
                assert np.array_equal(np.array(got[1], float), want[1], equal_nan=True)
                assert len(got[0]) <= max_points
        got = query_series(s, job_id, "loss", 2000)
        assert 1e6 in got[1]


def test_a_read_touches_rows_in_proportion_to_what_it_shows(db, monkeypatch):
    """The rows the database returns for one read at max_points=1000: the same bound for a
    series of 20k points as for one of 400k (1,001 for the first points, at most 16 stored buckets
    per bucket shown, 31 per level at each edge)."""
    rows_read = []
    query = Store.query

    def counting(self, sql, params):
        rows = query(self, sql, params)
        rows_read.append(len(rows))
        return rows

    short, long = new_job(db), new_job(db)
    ramp = np.linspace(0, 1, 400_000)
    store(db, short, np.arange(1, 20_001), ramp[:20_000])
    for i in range(0, 400_000, 200_000):
        store(db, long, np.arange(i + 1, i + 200_001), ramp[i : i + 200_000])
    monkeypatch.setattr(Store, "query", counting)
    bound = 1001 + 16 * 500 + 2 * ((1 << BITS) - 1) * len(LEVELS) + 1
    with db.sessions() as s:
        for job_id in (short, long):
            for since in (0, 123_457 % 20_000):
                rows_read.clear()
                steps, _ = query_series(s, job_id, "loss", 1000, since)
                assert 500 <= len(steps) <= 1000
                assert sum(rows_read) <= bound, (job_id, since, sum(rows_read))


def test_the_migration_builds_summaries_for_series_already_stored(db_url):
    upgrade(db_url, "0010")
    engine = create_engine(db_url)
    rng = np.random.default_rng(5)
    steps = np.cumsum(rng.integers(1, 5, size=20_000))
    values = rng.normal(size=len(steps))
    values[::97] = np.nan
    before = Database(db_url)  # the schema of 0010: jobs and their raw points only
    job_id = new_job(before)
    before.engine.dispose()
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO metrics (job_id, step, key, value, time) VALUES (:j, :s, :k, :v, 0)"),
            [
                {"j": job_id, "s": int(s), "k": k, "v": None if np.isnan(v) else float(v)}
                for s, v in zip(steps, values, strict=True)
                for k in ("loss", "acc")
            ],
        )
    engine.dispose()
    upgrade(db_url)
    database = Database(db_url)
    for key in ("loss", "acc"):
        assert stored(database, job_id, key) == expected(steps, values)
    with database.sessions() as s:
        assert Store(s.connection(), job_id).lasts() == {"loss": steps[-1], "acc": steps[-1]}
    database.engine.dispose()


def test_deleting_a_job_deletes_its_summaries(db):
    job_id, other = new_job(db), new_job(db)
    for j in (job_id, other):
        store(db, j, np.arange(1, 10_000), np.sin(np.arange(1, 10_000)))
    with db.sessions() as s:
        s.delete(s.get(Job, job_id))
        s.commit()
        for model in (MetricBucket, MetricSeries):
            assert s.scalars(select(model).where(model.job_id == job_id)).first() is None
            assert s.scalars(select(model).where(model.job_id == other)).first() is not None
