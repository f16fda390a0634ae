"""Webhooks: the events a user can be told of, the outbox rows a change adds in its own
transaction, the bodies that are sent and how they are signed.

A job's or sweep's change and its deliveries commit together (the outbox), so an event is
never lost to a crash between the two; service/webhook_sender.py sends them. Each delivery
is signed as Stripe signs its webhooks: ``Nestor-Signature: t=<unix time>,v1=<hex>``, the
hex being HMAC-SHA256 under the webhook's secret of ``f"{t}.{body}"``. The secret is
derived from the service's signing key and a nonce stored with the webhook, and shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import Counter
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from .models import Job, Sweep, Webhook, WebhookDelivery, utcnow

# Every event a webhook may subscribe to, with what it means.
EVENTS = {
    "job.succeeded": "a job finished training",
    "job.target_reached": "a job finished because it reached its stop_at target",
    "job.failed": "a job failed (its error is in the body)",
    "job.cancelled": "a job was cancelled",
    "job.stopped_early": "a sweep's early stopping ended a trial",
    "job.preempted": "a running job lost its workers and went back to the queue",
    "sweep.succeeded": "every trial of a sweep ended, none failed",
    "sweep.failed": "every trial of a sweep ended, one or more failed",
    "sweep.cancelled": "a sweep was cancelled",
}
PING = "ping"  # sent on request (POST /v1/webhooks/{id}/ping), whatever the subscription
FORMATS = ("json", "slack")
SECRET_PREFIX = "whsec_"
MAX_TEXT = 2000  # characters of an error or reason in a body


# ------------------------------------------------------------------------- secrets
def new_nonce() -> str:
    return secrets.token_hex(16)


def webhook_secret(key: bytes, webhook_id: int, nonce: str) -> str:
    """The webhook's signing secret: derived, never stored (only ``nonce`` is)."""
    digest = hmac.new(key, f"webhook:{webhook_id}:{nonce}".encode(), hashlib.sha256)
    return SECRET_PREFIX + digest.hexdigest()


def signature(secret: str, body: str, timestamp: int) -> str:
    """The ``Nestor-Signature`` header of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


# -------------------------------------------------------------------------- outbox
def job_events(old: str, new: str, reached_target_at_step: int | None) -> list[str]:
    """The events a job's move from ``old`` to ``new`` is, the most specific first: a
    webhook is sent the first one it subscribes to (one delivery per change)."""
    if new == "queued":
        return ["job.preempted"] if old == "running" else []
    if new == "succeeded" and reached_target_at_step is not None:
        return ["job.target_reached", "job.succeeded"]
    if new in ("succeeded", "failed", "cancelled", "stopped_early"):
        return [f"job.{new}"]
    return []


def job_changed(
    db: Session,
    job: Job,
    was: str,
    status: str,
    reason: str | None,
    reached_target_at_step: int | None,
) -> None:
    """Add the deliveries ``job``'s move from ``was`` to ``status`` owes its owner's
    webhooks to the caller's transaction; jobs.transition calls this."""
    reached = (
        reached_target_at_step if reached_target_at_step is not None else job.reached_target_at_step
    )
    events = job_events(was, status, reached)
    if not events or job.owner_id is None:
        return
    snapshot = {
        "id": job.id,
        "name": job.name,
        "status": status,
        "reason": _clip(reason),
        "error": _clip(reason) if status == "failed" else None,
        "sweep_id": job.sweep_id,
        "reached_target_at_step": reached if status == "succeeded" else None,
    }
    _enqueue(db, job.owner_id, events, f"job {job.id}", {"job": snapshot})


def sweep_changed(db: Session, sweep: Sweep, status: str, trials: Counter[str]) -> None:
    """Add the deliveries a sweep's end owes its owner's webhooks to the caller's
    transaction; ``trials``: its trials' statuses, counted."""
    event = f"sweep.{status}"
    if event not in EVENTS or sweep.owner_id is None:
        return
    snapshot = {"id": sweep.id, "name": sweep.name, "status": status, "trials": dict(trials)}
    _enqueue(db, sweep.owner_id, [event], f"sweep {sweep.id}", {"sweep": snapshot})


def ping(db: Session, webhook: Webhook) -> WebhookDelivery:
    """Queue a ``ping`` delivery to ``webhook`` (the caller commits)."""
    now = utcnow()
    delivery = WebhookDelivery(
        webhook_id=webhook.id,
        event=PING,
        subject=f"webhook {webhook.id}",
        payload={"created_at": now.isoformat(), "webhook": {"id": webhook.id}},
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    db.add(delivery)
    db.flush()
    return delivery


def _enqueue(
    db: Session, owner_id: int, events: list[str], subject: str, payload: dict[str, Any]
) -> None:
    hooks = db.execute(
        select(Webhook.id, Webhook.events).where(
            Webhook.owner_id == owner_id, Webhook.active.is_(True)
        )
    ).all()
    now = utcnow()
    rows = []
    for webhook_id, subscribed in hooks:
        event = next((e for e in events if e in subscribed), None)
        if event is not None:
            rows.append(
                {
                    "webhook_id": webhook_id,
                    "event": event,
                    "subject": subject,
                    "payload": {"created_at": now.isoformat(), **payload},
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
            )
    if rows:
        db.execute(insert(WebhookDelivery), rows)


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


# -------------------------------------------------------------------------- bodies
def render(delivery_id: int, event: str, payload: dict[str, Any], fmt: str, api_url: str) -> str:
    """The body sent for a delivery: the JSON event document, or for ``fmt`` "slack" a
    Slack incoming-webhook message ``{"text": ...}``."""
    doc: dict[str, Any] = {"id": delivery_id, "event": event, "created_at": payload["created_at"]}
    for kind in ("job", "sweep"):
        if kind in payload:
            subject = payload[kind]
            doc[kind] = {
                **subject,
                "url": f"{api_url}/v1/{kind}s/{subject['id']}",
                "dashboard_url": f"{api_url}/{kind}s/{subject['id']}",
            }
    if "webhook" in payload:
        doc["webhook"] = payload["webhook"]
    if fmt == "slack":
        return json.dumps({"text": slack_text(doc)})
    return json.dumps(doc)


def slack_text(doc: dict[str, Any]) -> str:
    """One line for a person: what happened to which job or sweep, and a link to it."""
    event = doc["event"]
    if event == PING:
        return f"Nestor: ping for webhook {doc['webhook']['id']}"
    kind = "job" if "job" in doc else "sweep"
    subject = doc[kind]
    what = {
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "was cancelled",
        "stopped_early": "was stopped early",
        "preempted": "lost its workers and was queued again",
        "target_reached": "reached its target",
    }[event.split(".", 1)[1]]
    text = f"Nestor: {kind} {subject['id']} '{subject['name']}' {what}"
    if kind == "job":
        detail = subject.get("error") or subject.get("reason")
    else:
        detail = ", ".join(f"{n} {status}" for status, n in sorted(subject["trials"].items()))
    if detail:
        text += f": {detail}"
    return f"{_slack_escape(text)} <{subject['dashboard_url']}>"


def _slack_escape(text: str) -> str:
    """Slack reads &, < and > as markup; a job's name and error are shown as written."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
