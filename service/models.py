"""SQLAlchemy 2.0 models. Alembic (migrations/) owns the schema; the app never calls
create_all."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


# Terminal states never change again; "stopped_early" is for sweep trials (ASHA).
TERMINAL = ("succeeded", "failed", "cancelled", "stopped_early")
STATUSES = ("queued", "running", *TERMINAL)


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="running", index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # a TrainSpec, stored verbatim
    priority: Mapped[int] = mapped_column(Integer, default=0)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id"), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submission_id: Mapped[str | None] = mapped_column(String(100))  # the Ray job
    run_dir: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    stop_reason: Mapped[str | None] = mapped_column(Text)  # set when stopped early
    pending_reason: Mapped[str | None] = mapped_column(Text)  # why a queued job waits
    last_step: Mapped[int] = mapped_column(Integer, default=0)
    # When DELETE .../artifacts freed the run's storage (its log is kept).
    artifacts_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    # The step whose evaluation first reached the spec's stop_at target (null: not reached).
    reached_target_at_step: Mapped[int | None] = mapped_column(Integer)
    # The workers a running job trains on (as its rank 0 last reported), and for an elastic
    # job the size the service asked for (launch, capacity freed, a resize by hand).
    workers: Mapped[int | None] = mapped_column(Integer)
    target_workers: Mapped[int | None] = mapped_column(Integer)
    # Resized by hand: the scheduler no longer grows it when capacity frees.
    workers_pinned: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_jobs_queue", "status", "priority", "id"),)

    @property
    def run_dir_path(self) -> Path:
        return Path(self.run_dir or "")


class Metric(Base):
    """One point of one series. (job, step, key) is unique, so re-sent batches (retries,
    replays after a restart) never duplicate a point. Ids only grow (AUTOINCREMENT on
    SQLite, a sequence on PostgreSQL): live streams use them as their cursor."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    time: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("job_id", "key", "step", name="uq_metrics_job_key_step"),
        Index("ix_metrics_job_id_id", "job_id", "id"),  # what live streams poll
        {"sqlite_autoincrement": True},
    )


class MetricSeries(Base):
    """One series of one job: its last step (the frontier of its sealed summaries) and
    its open buckets (service/summaries.py: Open; NULL when not known)."""

    __tablename__ = "metric_series"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_step: Mapped[int] = mapped_column(Integer)
    open: Mapped[bytes | None] = mapped_column(LargeBinary)


class MetricBucket(Base):
    """A sealed bucket of 32**level steps of one series: its extremes and the first steps
    holding them (service/summaries.py)."""

    __tablename__ = "metric_buckets"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    lo: Mapped[float] = mapped_column(Float)
    lo_step: Mapped[int] = mapped_column(Integer)
    hi: Mapped[float] = mapped_column(Float)
    hi_step: Mapped[int] = mapped_column(Integer)

    __table_args__ = ({"sqlite_with_rowid": False},)


class Event(Base):
    """A status change of a job (or sweep), with its reason."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweeps.id"), index=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)


class User(Base):
    """A person (or a robot) with tokens; disabling one stops all of their tokens at once."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


SCOPES = ("read", "submit", "code", "admin")


class ApiToken(Base):
    """A bearer token, stored as its SHA-256 digest (the token itself is shown once). A
    user's token has scopes and maybe an expiry; a worker token (``role`` "worker") may only
    ingest into its job's current attempt (``submission_id``) and is revoked when it ends."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # "user" | "worker"
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    submission_id: Mapped[str | None] = mapped_column(String(100))  # a worker's attempt
    configured: Mapped[bool] = mapped_column(Boolean, default=False)  # NESTOR_ADMIN_TOKEN's


class Audit(Base):
    """Who did what, when: append-only (nothing updates or deletes a row)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    token_id: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(50))  # "job.submit", "token.revoke", ...
    target: Mapped[str | None] = mapped_column(String(100))  # "job 12", "user 3"
    detail: Mapped[str | None] = mapped_column(Text)


class Package(Base):
    """A code package: a zip stored once under its content's hash (HOME/packages/<hex>.zip),
    checked at upload and never imported by the service."""

    __tablename__ = "packages"

    id: Mapped[str] = mapped_column(String(71), primary_key=True)  # "sha256:" and 64 hex
    size: Mapped[int] = mapped_column(BigInteger)  # the archive's bytes
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, size}], by name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)


class Webhook(Base):
    """A user's HTTP endpoint told about their jobs' and sweeps' ends (service/webhooks.py).
    Its signing secret is derived from the service's signing key and ``nonce`` and shown
    once: a copy of the database alone does not reveal it."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)  # the event names it is sent
    format: Mapped[str] = mapped_column(String(10))  # "json" | "slack"
    nonce: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=True)  # False once deleted


class WebhookDelivery(Base):
    """One event for one webhook: the outbox row written in the transaction of the change
    it tells of, then sent (and retried) by the deliverer; its history in the API."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(
        ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(50))  # "job.failed", "ping", ...
    subject: Mapped[str | None] = mapped_column(String(100))  # "job 12", "sweep 3"
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # the subject as it was then
    body: Mapped[str | None] = mapped_column(Text)  # what is sent, made at the first attempt
    status: Mapped[str] = mapped_column(String(20), default="pending")  # delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
