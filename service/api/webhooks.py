"""/v1/webhooks: a user's endpoints told when their jobs and sweeps end, and each one's
delivery history. A user sees only their own (another's is a 404); admins see everyone's.
The signing secret comes back once, when the webhook is made."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..audit import record
from ..auth import Principal
from ..deps import ReadDep, SessionDep, SubmitDep
from ..models import User, Webhook, WebhookDelivery
from ..schemas import UtcDatetime
from ..webhooks import EVENTS, new_nonce, ping, webhook_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a webhook id")]
URL_MAX = 2000


# ---------------------------------------------------------------------- schemas
class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=URL_MAX,
        description="http:// or https:// address the events are POSTed to",
        examples=["https://hooks.example.com/nestor"],
    )
    events: list[str] = Field(
        default_factory=lambda: list(EVENTS),
        min_length=1,
        max_length=len(EVENTS),
        description=f"the events to send (default: all): {', '.join(EVENTS)}",
    )
    format: Literal["json", "slack"] = Field(
        "json", description='"slack": a Slack incoming-webhook body {"text": ...}'
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        shown = url if len(url) <= 200 else url[:200] + "..."
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises on a port that is not a number in range)
            httpx.URL(url)
        except (ValueError, httpx.InvalidURL):
            raise ValueError(f"{shown!r} is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown!r}: give an http:// or https:// URL with a host")
        if any(c.isspace() or ord(c) < 32 for c in url):
            raise ValueError(f"{shown!r}: a URL has no spaces or control characters")
        return url

    @field_validator("events")
    @classmethod
    def _known_events(cls, events: list[str]) -> list[str]:
        for name in events:
            if name not in EVENTS:
                raise ValueError(f"unknown event {name[:100]!r}; events are: {', '.join(EVENTS)}")
        return list(dict.fromkeys(events))


class WebhookPublic(BaseModel):
    id: int
    url: str
    events: list[str]
    format: str
    owner: str | None
    created_at: UtcDatetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="signs every delivery (Nestor-Signature): shown this once only")


class WebhookList(BaseModel):
    data: list[WebhookPublic]
    count: int


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    webhook_id: int
    event: str
    subject: str | None = Field(description='what it tells of: "job 12", "sweep 3"')
    status: str = Field(description="pending, delivered or failed (attempts ran out)")
    attempts: int
    next_attempt_at: UtcDatetime | None = Field(description="while pending")
    last_status_code: int | None = Field(description="the receiver's last HTTP status")
    last_error: str | None = Field(description="why the last attempt failed")
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None
    body: str | None = Field(description="what is sent (made at the first attempt)")


class DeliveryList(BaseModel):
    data: list[DeliveryPublic]
    count: int


# ---------------------------------------------------------------------- helpers
def _public(webhook: Webhook, owner: str | None) -> WebhookPublic:
    return WebhookPublic(
        id=webhook.id,
        url=webhook.url,
        events=list(webhook.events),
        format=webhook.format,
        owner=owner,
        created_at=webhook.created_at,
    )


def _own(db: Session, token: Principal, webhook_id: int) -> Webhook:
    """The caller's active webhook (an admin: anyone's); 404 otherwise, so that another
    user's webhooks are not even known to exist."""
    webhook = db.get(Webhook, webhook_id)
    if webhook is None or not webhook.active or not token.owns(webhook.owner_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"webhook {webhook_id} not found")
    return webhook


def _where(url: str) -> str:
    """A URL's scheme and host, for the audit log: the rest may hold a secret (Slack's
    incoming-webhook URLs do)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


# ---------------------------------------------------------------------- routes
@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookCreated)
def create_webhook(
    body: WebhookCreate, request: Request, db: SessionDep, token: SubmitDep
) -> WebhookCreated:
    """Register a URL to be told of the caller's jobs' and sweeps' ``events``. The answer's
    ``secret`` (shown once) verifies each delivery's ``Nestor-Signature``."""
    webhook = Webhook(
        owner_id=token.user_id,
        url=body.url,
        events=body.events,
        format=body.format,
        nonce=new_nonce(),
        active=True,
    )
    db.add(webhook)
    db.flush()
    record(
        db,
        token,
        "webhook.create",
        f"webhook {webhook.id}",
        f"{_where(body.url)} ({body.format}): {', '.join(body.events)}",
    )
    db.commit()
    secret = webhook_secret(request.app.state.signing_key, webhook.id, webhook.nonce)
    return WebhookCreated(**_public(webhook, token.user_name).model_dump(), secret=secret)


@router.get("", response_model=WebhookList)
def list_webhooks(
    db: SessionDep,
    token: ReadDep,
    all_users: Annotated[bool, Query(alias="all", description="every user's (admins)")] = False,
) -> WebhookList:
    """The caller's webhooks (never their secrets); ``all=true``: every user's, for admins."""
    if all_users and not token.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token lacks the 'admin' scope")
    query = (
        select(Webhook, User.name)
        .join(User, User.id == Webhook.owner_id)
        .where(Webhook.active.is_(True))
    )
    if not all_users:
        query = query.where(Webhook.owner_id == token.user_id)
    rows = db.execute(query.order_by(Webhook.id)).all()
    return WebhookList(data=[_public(w, name) for w, name in rows], count=len(rows))


@router.delete("/{webhook_id}", response_model=WebhookPublic)
def delete_webhook(webhook_id: WebhookId, db: SessionDep, token: SubmitDep) -> WebhookPublic:
    """Stop sending to this webhook: its pending deliveries are dropped (marked failed)."""
    webhook = _own(db, token, webhook_id)
    webhook.active = False
    db.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook.id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error="the webhook was deleted")
    )
    record(db, token, "webhook.delete", f"webhook {webhook.id}", _where(webhook.url))
    db.commit()
    owner = db.scalar(select(User.name).where(User.id == webhook.owner_id))
    return _public(webhook, owner)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    webhook_id: WebhookId,
    db: SessionDep,
    token: ReadDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeliveryList:
    """The webhook's deliveries, newest first: each one's status, attempts, the receiver's
    last answer or the error, and the body sent."""
    webhook = _own(db, token, webhook_id)
    rows = db.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook.id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    ).all()
    count = db.scalar(select(func.count()).where(WebhookDelivery.webhook_id == webhook.id))
    data = [_delivery_public(d) for d in rows]
    return DeliveryList(data=data, count=count or 0)


@router.post(
    "/{webhook_id}/ping", status_code=status.HTTP_202_ACCEPTED, response_model=DeliveryPublic
)
def ping_webhook(
    webhook_id: WebhookId, request: Request, db: SessionDep, token: SubmitDep
) -> DeliveryPublic:
    """Queue a ``ping`` delivery, to check the receiver and its signature check; follow it
    in the deliveries."""
    webhook = _own(db, token, webhook_id)
    delivery = ping(db, webhook)
    db.commit()
    sender = getattr(request.app.state, "webhooks", None)
    if sender is not None:
        sender.wake()
    return _delivery_public(delivery)


def _delivery_public(delivery: WebhookDelivery) -> DeliveryPublic:
    public = DeliveryPublic.model_validate(delivery)
    if delivery.status != "pending":
        public.next_attempt_at = None
    return public
