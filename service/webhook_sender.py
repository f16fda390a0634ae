"""The webhook sender: a thread beside the scheduler that sends due deliveries, signed, and
records each attempt on the delivery's row; a failure is tried again after
``webhook_retry_base_seconds * 2 ** (attempt - 1)``, and after ``webhook_max_attempts`` the
delivery is marked failed.

Replicas may share a database: each attempt is claimed by a compare-and-set on the
delivery's attempt count, so two senders never make the same attempt. A claim holds the row
for the send's timeout and a minute more; a sender that dies mid-send leaves the delivery to
be tried again then (delivered at least once, never lost).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import Database
from .models import Webhook, WebhookDelivery, utcnow
from .settings import Settings
from .webhooks import render, signature, webhook_secret

log = logging.getLogger("nestor.webhooks")
CLAIM_MARGIN = timedelta(seconds=60)  # beyond the send's timeout
WORKERS = 4  # deliveries sent at once: a receiver that hangs holds up one of them, not all
MAX_ROUNDS = 25  # rounds of WORKERS deliveries in one pass
RESPONSE_BYTES = 1024  # of a receiver's answer, read for the delivery's error


@dataclass(frozen=True)
class Claimed:
    """One attempt this sender owns."""

    id: int
    attempt: int  # from 1
    event: str
    url: str
    body: str
    secret: str


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # None: no answer
    error: str | None  # None: delivered


def retry_delay(attempt: int, base: float) -> float:
    """Seconds after failed attempt ``attempt`` (from 1) before the next one."""
    return base * 2 ** (attempt - 1)


def claim(
    db: Session, now: datetime, *, key: bytes, api_url: str, hold: timedelta, limit: int
) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries of active webhooks, oldest due first: each
    attempt counted and its row held until ``now + hold``. A delivery's body is made at its
    first attempt and kept, so every attempt sends the same bytes."""
    due = db.execute(
        select(
            WebhookDelivery.id,
            WebhookDelivery.attempts,
            WebhookDelivery.event,
            WebhookDelivery.payload,
            WebhookDelivery.body,
            Webhook.id.label("webhook_id"),
            Webhook.url,
            Webhook.format,
            Webhook.nonce,
        )
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            Webhook.active.is_(True),
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    claimed = []
    for row in due:
        body = row.body or render(row.id, row.event, row.payload, row.format, api_url)
        won = db.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == row.id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == row.attempts,
            )
            .values(attempts=row.attempts + 1, next_attempt_at=now + hold, body=body)
        ).rowcount
        if won == 1:
            secret = webhook_secret(key, row.webhook_id, row.nonce)
            claimed.append(Claimed(row.id, row.attempts + 1, row.event, row.url, body, secret))
    db.commit()
    return claimed


def send(http: httpx.Client, delivery: Claimed) -> Outcome:
    """POST the delivery, signed now; a 2xx answer delivers it."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "Nestor-Event": delivery.event,
        "Nestor-Delivery": str(delivery.id),
        "Nestor-Signature": signature(delivery.secret, delivery.body, timestamp),
    }
    try:
        with http.stream(
            "POST", delivery.url, content=delivery.body.encode(), headers=headers
        ) as resp:
            answer = b""
            for chunk in resp.iter_bytes():
                answer += chunk
                if len(answer) >= RESPONSE_BYTES:
                    break
    except httpx.HTTPError as e:
        url = httpx.URL(delivery.url)
        where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        return Outcome(None, f"cannot reach {where}: {type(e).__name__}: {e}")
    if 200 <= resp.status_code < 300:
        return Outcome(resp.status_code, None)
    text = answer[:RESPONSE_BYTES].decode(errors="replace").strip()
    return Outcome(resp.status_code, f"HTTP {resp.status_code}" + (f": {text}" if text else ""))


def record(
    db: Session,
    delivery: Claimed,
    outcome: Outcome,
    now: datetime,
    *,
    retry_base: float,
    max_attempts: int,
) -> str:
    """Store an attempt's outcome on its delivery; returns the delivery's status now."""
    values: dict = {"last_status_code": outcome.status_code, "last_error": outcome.error}
    if outcome.error is None:
        values |= {"status": "delivered", "delivered_at": now}
    elif delivery.attempt >= max_attempts:
        values |= {"status": "failed"}
    else:
        delay = retry_delay(delivery.attempt, retry_base)
        values |= {"status": "pending", "next_attempt_at": now + timedelta(seconds=delay)}
    db.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.attempts == delivery.attempt)
        .values(**values)
    )
    db.commit()
    return values["status"]


class WebhookSender:
    """The thread that sends due deliveries every ``webhook_poll_seconds`` (or at once when
    woken); ``run_once`` is one pass, for tests and for the thread."""

    def __init__(self, settings: Settings, db: Database, key: bytes) -> None:
        self.settings = settings
        self.db = db
        self.key = key
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": "Nestor-Webhooks"},
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nestor-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=self.settings.webhook_timeout_seconds + 5)
        self._http.close()

    def wake(self) -> None:
        """Look for due deliveries now (one was queued), not at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("webhook pass failed")
            self._wake.wait(self.settings.webhook_poll_seconds)
            self._wake.clear()

    def run_once(self) -> int:
        """Send what is due, WORKERS deliveries at a time, for at most MAX_ROUNDS rounds;
        returns how many attempts were made."""
        hold = timedelta(seconds=self.settings.webhook_timeout_seconds) + CLAIM_MARGIN
        made = 0
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="nestor-webhook") as pool:
            for _ in range(MAX_ROUNDS):
                if self._stop.is_set():
                    break
                with self.db.sessions() as db:
                    claimed = claim(
                        db,
                        utcnow(),
                        key=self.key,
                        api_url=self.settings.api_url,
                        hold=hold,
                        limit=WORKERS,
                    )
                if not claimed:
                    break
                outcomes = list(pool.map(lambda d: send(self._http, d), claimed))
                self._record(claimed, outcomes)
                made += len(claimed)
        return made

    def _record(self, claimed: list[Claimed], outcomes: list[Outcome]) -> None:
        with self.db.sessions() as db:
            for delivery, outcome in zip(claimed, outcomes, strict=True):
                status = record(
                    db,
                    delivery,
                    outcome,
                    utcnow(),
                    retry_base=self.settings.webhook_retry_base_seconds,
                    max_attempts=self.settings.webhook_max_attempts,
                )
                if status == "failed":
                    log.warning("webhook delivery %s failed: %s", delivery.id, outcome.error)
