"""Webhooks against a real HTTP receiver on loopback, on SQLite and PostgreSQL: registration
and its validation, signed deliveries of job and sweep events, the Slack body, retries with
backoff while the receiver is down and delivery once it is back, and one user's webhooks
hidden from another."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.jobs import transition
from service.models import Job, Sweep
from service.sweeps import update_sweep_status
from service.webhook_sender import WebhookSender
from service.webhooks import EVENTS

SPEC = {"model": "mnist1d-mlp", "dataset": {"name": "mnist1d", "num_samples": 1000}}
RETRY_BASE = 0.2  # seconds: the test's backoff is 0.2 s, 0.4 s, 0.8 s, ...


class Receiver:
    """A real HTTP server on 127.0.0.1 (``port`` 0: any free one) that records every request
    (its headers and body) and answers each with ``status``."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.requests: list[dict] = []
        self.status = status
        self.received = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                with receiver.received:
                    receiver.requests.append({"headers": dict(self.headers), "body": body})
                    receiver.received.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "9")
                self.end_headers()
                self.wfile.write(b"not today" if receiver.status >= 300 else b"received!")

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        with self.received:
            assert self.received.wait_for(lambda: len(self.requests) >= n, timeout), self.requests
        return self.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, header: str, body: str, tolerance: float = 300) -> bool:
    """What a receiver does (the README's snippet): HMAC-SHA256 of "{t}.{body}" under the
    secret, compared in constant time, and a timestamp no older than ``tolerance``."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.{body}".encode(), hashlib.sha256)
    fresh = abs(time.time() - int(fields["t"])) <= tolerance
    return hmac.compare_digest(expected.hexdigest(), fields["v1"]) and fresh


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sender(client):
    """The app's webhook sender (the API fixture runs without a scheduler, so without one),
    with a backoff of tenths of a second."""
    settings = client.app.state.settings.model_copy(
        update={"webhook_retry_base_seconds": RETRY_BASE, "webhook_poll_seconds": 0.05}
    )
    s = WebhookSender(settings, client.app.state.db, client.app.state.signing_key)
    yield s
    s.stop()


def add_webhook(client, url: str, headers: dict | None = None, **body) -> dict:
    resp = client.post("/v1/webhooks", json={"url": url, **body}, headers=headers or {})
    assert resp.status_code == 201, resp.text
    return resp.json()


def submit(client, name: str = "t", headers: dict | None = None) -> int:
    resp = client.post("/v1/jobs", json={"name": name, "spec": SPEC}, headers=headers or {})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def move(client, job_id: int, *steps: tuple[str, str | None] | tuple[str, str | None, int]):
    """Take the job through ``(status, reason[, reached_target_at_step])`` steps, as the
    scheduler and the ingest path do."""
    with client.app.state.db.sessions() as db:
        job = db.get(Job, job_id)
        for status, reason, *reached in steps:
            step = reached[0] if reached else None
            assert transition(db, job, status, reason, reached_target_at_step=step), status


def deliveries(client, webhook_id: int, headers: dict | None = None) -> list[dict]:
    resp = client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=headers or {})
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def test_register_list_delete_and_refuse_bad_fields(client):
    made = add_webhook(client, "https://hooks.example.com/nestor?team=ml")
    assert made["secret"].startswith("whsec_") and len(made["secret"]) == 6 + 64
    assert made["events"] == list(EVENTS) and made["format"] == "json"
    assert made["owner"] == "admin"
    listed = client.get("/v1/webhooks").json()
    assert listed["count"] == 1 and listed["data"][0]["url"] == made["url"]
    assert "secret" not in listed["data"][0]  # shown once

    for body, loc, words in [
        ({"url": "ftp://example.com/x"}, ["body", "url"], "'ftp://example.com/x'"),
        ({"url": "example.com/hook"}, ["body", "url"], "http:// or https://"),
        ({"url": "http://host:99999/"}, ["body", "url"], "is not a URL"),
        (
            {"url": "https://e.com", "events": ["job.failed", "job.exploded"]},
            ["body", "events"],
            "unknown event 'job.exploded'",
        ),
        ({"url": "https://e.com", "events": []}, ["body", "events"], "at least 1"),
        ({"url": "https://e.com", "format": "xml"}, ["body", "format"], "'json' or 'slack'"),
    ]:
        resp = client.post("/v1/webhooks", json=body)
        assert resp.status_code == 422, (body, resp.text)
        (error,) = resp.json()["detail"]
        assert error["loc"] == loc and words in error["msg"], (body, error)

    assert client.delete(f"/v1/webhooks/{made['id']}").status_code == 200
    assert client.get("/v1/webhooks").json() == {"data": [], "count": 0}
    for method, path in [
        ("delete", ""),
        ("get", "/deliveries"),
        ("post", "/ping"),
    ]:
        resp = getattr(client, method)(f"/v1/webhooks/{made['id']}{path}")
        assert resp.status_code == 404, (method, path)
    actions = [(a["action"], a["target"], a["detail"]) for a in client.get("/v1/audit").json()]
    assert (
        "webhook.create",
        f"webhook {made['id']}",
        "https://hooks.example.com (json): " + ", ".join(EVENTS),
    ) in actions  # the host only: the rest of a URL may be a secret
    assert ("webhook.delete", f"webhook {made['id']}", "https://hooks.example.com") in actions


def test_job_ends_are_delivered_signed_with_the_secret_shown_once(client, receiver, sender):
    hook = add_webhook(client, receiver.url)
    failed, finished = submit(client, "adan-32k"), submit(client, "lamb-32k")
    move(client, failed, ("running", "Ray job started"), ("failed", "rank 1: CUDA out of memory"))
    move(
        client,
        finished,
        ("running", "Ray job started"),
        ("queued", "requeued: Ray lost the job"),  # preempted
        ("running", "Ray job started"),
        ("succeeded", "training finished: val_loss <= 0.5 reached at step 40", 40),
    )
    assert sender.run_once() == 3
    # Sent at once, so they may arrive in any order: the delivery ids are the events'.
    got = sorted(receiver.wait_for(3), key=lambda r: int(r["headers"]["Nestor-Delivery"]))
    assert [r["headers"]["Nestor-Event"] for r in got] == [
        "job.failed",
        "job.preempted",
        "job.target_reached",  # the most specific event a webhook subscribes to, once
    ]
    history = {d["id"]: d for d in deliveries(client, hook["id"])}
    for request in got:
        headers, body = request["headers"], request["body"]
        assert headers["Content-Type"] == "application/json"
        assert verify(hook["secret"], headers["Nestor-Signature"], body)
        assert not verify(hook["secret"] + "0", headers["Nestor-Signature"], body)
        assert not verify(hook["secret"], headers["Nestor-Signature"], body + " ")
        doc = json.loads(body)
        assert (
            doc["id"] == int(headers["Nestor-Delivery"]) and doc["event"] == headers["Nestor-Event"]
        )
        sent = history[doc["id"]]
        assert sent["status"] == "delivered" and sent["attempts"] == 1
        assert sent["last_status_code"] == 200 and sent["body"] == body  # exactly what was sent
    first, _, last = (json.loads(r["body"]) for r in got)
    assert first["job"] == {
        "id": failed,
        "name": "adan-32k",
        "status": "failed",
        "reason": "rank 1: CUDA out of memory",
        "error": "rank 1: CUDA out of memory",
        "sweep_id": None,
        "reached_target_at_step": None,
        "url": f"http://127.0.0.1:8000/v1/jobs/{failed}",
        "dashboard_url": f"http://127.0.0.1:8000/jobs/{failed}",
    }
    assert last["job"]["status"] == "succeeded" and last["job"]["reached_target_at_step"] == 40
    assert datetime.fromisoformat(last["created_at"]).tzinfo is not None
    assert sender.run_once() == 0  # nothing is sent twice


def test_a_webhook_is_sent_only_the_events_it_subscribes_to(client, receiver, sender):
    hook = add_webhook(client, receiver.url, events=["job.succeeded", "job.cancelled"])
    cancelled, target, failed = submit(client), submit(client), submit(client)
    client.post(f"/v1/jobs/{cancelled}/cancel")
    move(client, target, ("running", None), ("succeeded", "training finished", 7))
    move(client, failed, ("running", None), ("failed", "boom"))
    sender.run_once()
    got = sorted(receiver.wait_for(2), key=lambda r: int(r["headers"]["Nestor-Delivery"]))
    assert [r["headers"]["Nestor-Event"] for r in got] == ["job.cancelled", "job.succeeded"]
    assert [json.loads(r["body"])["job"]["id"] for r in got] == [cancelled, target]
    assert len(deliveries(client, hook["id"])) == 2


def test_slack_body_is_one_escaped_line_with_a_link_and_still_signed(client, receiver, sender):
    hook = add_webhook(client, receiver.url, format="slack")
    job = submit(client, "a<b> & c")
    move(client, job, ("running", None), ("failed", "worker 1 died: <SIGKILL>"))
    sender.run_once()
    (got,) = receiver.wait_for(1)
    assert json.loads(got["body"]) == {
        "text": f"Nestor: job {job} 'a&lt;b&gt; &amp; c' failed: worker 1 died: &lt;SIGKILL&gt; "
        f"<http://127.0.0.1:8000/jobs/{job}>"
    }
    assert got["headers"]["Nestor-Event"] == "job.failed"
    assert verify(hook["secret"], got["headers"]["Nestor-Signature"], got["body"])


def test_a_sweep_that_ends_is_delivered(client, receiver, sender):
    add_webhook(client, receiver.url, events=["sweep.succeeded", "sweep.failed"])
    made = client.post(
        "/v1/sweeps", json={"name": "lr", "base": SPEC, "space": {"seed": [1, 2]}}
    ).json()
    trials = client.get("/v1/jobs", params={"sweep": made["id"]}).json()["data"]
    move(client, trials[0]["id"], ("running", None), ("succeeded", "training finished"))
    move(client, trials[1]["id"], ("running", None), ("failed", "diverged"))
    with client.app.state.db.sessions() as db:
        update_sweep_status(db, db.get(Sweep, made["id"]))
    sender.run_once()
    (got,) = receiver.wait_for(1)
    doc = json.loads(got["body"])
    assert doc["event"] == "sweep.failed" and doc["sweep"]["id"] == made["id"]
    assert doc["sweep"]["trials"] == {"succeeded": 1, "failed": 1}
    assert doc["sweep"]["url"] == f"http://127.0.0.1:8000/v1/sweeps/{made['id']}"


def test_a_receiver_that_is_down_is_retried_with_backoff_and_delivered_once_back(client, sender):
    """Connection refused: each attempt is recorded with its error and the next is scheduled
    twice as far off; the receiver comes back on the same port and the next attempt lands."""
    down = Receiver()
    port, url = down.port, down.url
    down.close()  # nothing listens on the port now
    hook = add_webhook(client, url)
    job = submit(client)
    move(client, job, ("running", None), ("failed", "boom"))

    gaps = []
    for attempt in (1, 2, 3):
        (pending,) = deliveries(client, hook["id"])
        wait = datetime.fromisoformat(pending["next_attempt_at"]).timestamp() - time.time()
        time.sleep(max(0.0, wait) + 0.02)
        before = time.time()
        assert sender.run_once() == 1
        (pending,) = deliveries(client, hook["id"])
        assert pending["status"] == "pending" and pending["attempts"] == attempt
        assert pending["last_status_code"] is None
        assert f"cannot reach 127.0.0.1:{port}: ConnectError" in pending["last_error"]
        gaps.append(datetime.fromisoformat(pending["next_attempt_at"]).timestamp() - before)
        assert sender.run_once() == 0  # not due yet: no attempt before its time
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= RETRY_BASE * 2 ** (attempt - 1), gaps  # 0.2 s, 0.4 s, 0.8 s

    back = Receiver(port)
    try:
        sender.start()  # the sender's own thread from here on
        (got,) = back.wait_for(1)
        assert verify(hook["secret"], got["headers"]["Nestor-Signature"], got["body"])
        assert json.loads(got["body"])["job"]["id"] == job
        deadline = time.time() + 10
        while (history := deliveries(client, hook["id"]))[0]["status"] == "pending":
            assert time.time() < deadline, history
            time.sleep(0.05)
        (delivered,) = history
        assert delivered["status"] == "delivered" and delivered["attempts"] == 4
        assert delivered["last_status_code"] == 200 and delivered["last_error"] is None
        assert delivered["next_attempt_at"] is None and delivered["delivered_at"]
    finally:
        sender.stop()
        back.close()


def test_a_receiver_that_keeps_refusing_is_given_up_on_after_the_last_attempt(client):
    settings = client.app.state.settings.model_copy(
        update={"webhook_retry_base_seconds": 0.05, "webhook_max_attempts": 3}
    )
    sender = WebhookSender(settings, client.app.state.db, client.app.state.signing_key)
    refusing = Receiver(status=503)
    try:
        hook = add_webhook(client, refusing.url)
        job = submit(client)
        move(client, job, ("running", None), ("failed", "boom"))
        deadline = time.time() + 10
        while (history := deliveries(client, hook["id"]))[0]["status"] == "pending":
            assert time.time() < deadline, history
            sender.run_once()
            time.sleep(0.05)
        (failed,) = history
        assert failed["status"] == "failed" and failed["attempts"] == 3
        assert failed["last_status_code"] == 503 and failed["last_error"] == "HTTP 503: not today"
        assert len(refusing.requests) == 3
        time.sleep(0.3)
        assert sender.run_once() == 0 and len(refusing.requests) == 3  # given up for good
    finally:
        sender.stop()
        refusing.close()


def test_two_senders_on_one_database_send_each_delivery_once(client, receiver):
    """Two replicas' senders at once: each delivery's attempt is claimed by one of them."""
    hook = add_webhook(client, receiver.url, events=["job.cancelled"])
    jobs = [submit(client) for _ in range(12)]
    for job in jobs:
        client.post(f"/v1/jobs/{job}/cancel")
    app = client.app
    senders = [WebhookSender(app.state.settings, app.state.db, app.state.signing_key)] * 2
    threads = [threading.Thread(target=s.run_once) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = receiver.wait_for(12)
    time.sleep(0.2)
    assert sorted(int(r["headers"]["Nestor-Delivery"]) for r in got) == sorted(
        d["id"] for d in deliveries(client, hook["id"])
    )
    assert len(receiver.requests) == 12
    assert {d["attempts"] for d in deliveries(client, hook["id"])} == {1}
    senders[0].stop()


def test_ping_is_sent_whatever_the_subscription(client, receiver, sender):
    hook = add_webhook(client, receiver.url, events=["sweep.failed"])
    resp = client.post(f"/v1/webhooks/{hook['id']}/ping")
    assert resp.status_code == 202 and resp.json()["event"] == "ping"
    sender.run_once()
    (got,) = receiver.wait_for(1)
    assert got["headers"]["Nestor-Event"] == "ping"
    assert json.loads(got["body"])["webhook"] == {"id": hook["id"]}
    assert verify(hook["secret"], got["headers"]["Nestor-Signature"], got["body"])


def test_one_user_never_sees_or_is_sent_anothers_webhooks(client, receiver, sender):
    def user(name: str) -> dict:
        made = client.post("/v1/users", json={"name": name, "scopes": ["read", "submit"]})
        assert made.status_code == 201, made.text
        return {"Authorization": f"Bearer {made.json()['token']}"}

    alice, bob = user("alice"), user("bob")
    bobs_receiver = Receiver()
    try:
        hers = add_webhook(client, receiver.url, headers=alice)
        add_webhook(client, bobs_receiver.url, headers=bob)
        listed = client.get("/v1/webhooks", headers=bob).json()["data"]
        assert [w["owner"] for w in listed] == ["bob"]
        for method, path in [("get", "/deliveries"), ("post", "/ping"), ("delete", "")]:
            resp = getattr(client, method)(f"/v1/webhooks/{hers['id']}{path}", headers=bob)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["detail"] == f"webhook {hers['id']} not found"
        assert client.get("/v1/webhooks", params={"all": "true"}, headers=bob).status_code == 403
        everyone = client.get("/v1/webhooks", params={"all": "true"}).json()  # the admin
        assert {w["owner"] for w in everyone["data"]} == {"alice", "bob"}

        job = submit(client, headers=alice)
        move(client, job, ("running", None), ("failed", "boom"))
        sender.run_once()
        receiver.wait_for(1)
        time.sleep(0.2)
        assert bobs_receiver.requests == []
        assert len(deliveries(client, hers["id"], headers=alice)) == 1
    finally:
        bobs_receiver.close()


def test_a_deleted_webhook_is_sent_nothing_more(client, receiver, sender):
    hook = add_webhook(client, receiver.url)
    job = submit(client)
    move(client, job, ("running", None), ("failed", "boom"))
    assert client.delete(f"/v1/webhooks/{hook['id']}").status_code == 200
    later = submit(client)
    move(client, later, ("running", None), ("failed", "boom"))
    assert sender.run_once() == 0
    time.sleep(0.1)
    assert receiver.requests == []


def test_retry_delays_double_from_the_base():
    from service.webhook_sender import retry_delay

    assert [retry_delay(n, 10) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 640, 1280]


def test_the_cli_adds_lists_pings_shows_deliveries_and_removes(api_server, receiver, capsys):
    from service.cli import main

    from .conftest import ADMIN

    live, _ = api_server
    where = ["--url", live.url, "--token", ADMIN]
    assert main(["webhooks", "add", receiver.url, "--events", "job.failed", "--slack", *where]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_")
    assert main(["webhooks", "list", *where]) == 0
    listed = capsys.readouterr().out
    assert receiver.url in listed and "slack" in listed and "job.failed" in listed
    webhook_id = int(listed.split()[0])
    assert main(["webhooks", "ping", str(webhook_id), *where]) == 0
    assert "ping queued" in capsys.readouterr().out
    app = live.app
    sender = WebhookSender(app.state.settings, app.state.db, app.state.signing_key)
    sender.run_once()
    (got,) = receiver.wait_for(1)
    assert json.loads(got["body"]) == {"text": f"Nestor: ping for webhook {webhook_id}"}
    assert verify(secret, got["headers"]["Nestor-Signature"], got["body"])
    assert main(["webhooks", "deliveries", str(webhook_id), *where]) == 0
    shown = capsys.readouterr().out
    assert "ping" in shown and "delivered" in shown and "1 attempts  HTTP 200" in shown
    assert main(["webhooks", "rm", str(webhook_id), *where]) == 0
    assert "removed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["webhooks", "rm", str(webhook_id), *where])
    assert "404" in capsys.readouterr().err
    sender.stop()
