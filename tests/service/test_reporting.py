"""Workers' reporting (workers.reporting.HttpReporter) against a live API: a batch the
service rejects is dropped, a service that is away is waited for, and the buffer is bounded."""

from __future__ import annotations

import time

from workers.reporting import HttpReporter

from ..helpers import worker_token
from .live import wait_for
from .test_api import SPEC


def reporter_for(live, client, **kw) -> tuple[HttpReporter, int]:
    job = client.submit(SPEC, name="reported")
    token = worker_token(live.app, job["id"])
    return HttpReporter(live.url, job["id"], token, flush_every=0.05, **kw), job["id"]


def steps(client, job_id: int, key: str = "train_loss") -> list[int]:
    series = client.metrics(job_id, keys=[key], max_points=100_000)["series"]
    return series.get(key, {"step": []})["step"]


def test_a_rejected_batch_is_dropped_and_the_batches_after_it_still_arrive(api_server):
    """A 4xx used to be retried for ever, holding back every later batch."""
    live, client = api_server
    reporter, job_id = reporter_for(live, client)
    reporter.status("running")
    reporter.metrics(1, {"k" * 101: 1.0})  # keys are at most 100 characters: a 422
    wait_for(lambda: reporter.rejected_batches == 1, timeout=30, every=0.05)
    for step in (2, 3):
        reporter.metrics(step, {"train_loss": 1.0 / step})
    reporter.status("succeeded")
    reporter.close(timeout=30)
    assert steps(client, job_id) == [2, 3]
    assert client.job(job_id)["status"] == "succeeded"


def test_reports_wait_for_a_service_that_is_away_and_keep_their_order(api_server):
    live, client = api_server
    reporter, job_id = reporter_for(live, client)
    reporter.status("running")
    reporter.metrics(1, {"train_loss": 1.0})
    wait_for(lambda: steps(client, job_id) == [1], timeout=30, every=0.05)
    live.stop()
    for step in range(2, 41):
        reporter.metrics(step, {"train_loss": 1.0 / step})
    reporter.status("succeeded")
    time.sleep(1.0)  # a few failed attempts, backing off
    live.start()
    reporter.close(timeout=60)
    assert steps(client, job_id) == list(range(1, 41))
    assert client.job(job_id)["status"] == "succeeded"


def test_the_buffer_is_bounded_and_never_drops_status_messages(api_server):
    live, client = api_server
    reporter, job_id = reporter_for(live, client, max_points=50)
    live.stop()
    reporter.status("running")
    for step in range(1, 201):
        reporter.metrics(step, {"train_loss": 1.0 / step})
    reporter.status("succeeded")
    assert reporter.dropped_points == 150
    live.start()
    reporter.close(timeout=60)
    assert steps(client, job_id) == list(range(151, 201))  # the newest were kept
    assert client.job(job_id)["status"] == "succeeded"
