"""Bearer tokens: random secrets shown once, stored as SHA-256 digests; each a user's, with
scopes and maybe an expiry, or a worker's, good for ingesting into one job's attempt."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from .audit import record
from .models import SCOPES, ApiToken, User, utcnow
from .schemas import as_utc


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "nst_" + secrets.token_urlsafe(32)


ALL_SCOPES = list(SCOPES)
ADMIN_USER = "admin"
LAST_USED_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often


def admin_user(db: Session) -> User:
    """The first admin, "admin" (made by the migration, or here on an empty database)."""
    user = db.scalar(select(User).where(User.name == ADMIN_USER))
    if user is None:
        user = User(name=ADMIN_USER)
        db.add(user)
        db.flush()
    return user


def create_token(
    db: Session,
    name: str,
    role: str,
    job_id: int | None = None,
    token: str | None = None,
    *,
    user_id: int | None = None,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
    submission_id: str | None = None,
    configured: bool = False,
) -> str:
    """Store a token's digest and return the token itself (the only time it is seen).
    ``role``: "worker" (ingest into ``job_id`` only), "user" (``scopes`` of ``user_id``), or
    "admin" (a token of the admin user with every scope)."""
    token = token or new_token()
    if role == "admin":
        role, user_id, scopes = "user", admin_user(db).id, ALL_SCOPES
    db.add(
        ApiToken(
            name=name,
            token_hash=hash_token(token),
            role=role,
            job_id=job_id,
            user_id=user_id,
            scopes=list(scopes or []),
            expires_at=expires_at,
            submission_id=submission_id,
            configured=configured,
        )
    )
    db.commit()
    return token


@dataclass(frozen=True)
class Principal:
    """Who a request is: the token's row id, its user (None for a worker), its scopes."""

    token_id: int
    role: str  # "user" | "worker"
    user_id: int | None
    user_name: str | None
    scopes: frozenset[str]
    job_id: int | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        """Scopes imply: admin everything, code submit (a job that runs a package)."""
        if self.role != "user":
            return False
        s = self.scopes
        return scope in s or "admin" in s or (scope == "submit" and "code" in s)

    def owns(self, owner_id: int | None) -> bool:
        return self.admin or (owner_id is not None and owner_id == self.user_id)


# Built once: constructing the select on every request cost more than running it.
_LOOKUP = (
    select(
        ApiToken.id,
        ApiToken.token_hash,
        ApiToken.revoked,
        ApiToken.expires_at,
        ApiToken.last_used_at,
        ApiToken.role,
        ApiToken.user_id,
        ApiToken.scopes,
        ApiToken.job_id,
        User.name,
        User.disabled,
    )
    .outerjoin(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("digest"))
)


def lookup(db: Session, token: str) -> Principal | None:
    """The principal a token stands for; None when it is unknown, revoked, expired, or its
    user is disabled. One indexed read (the digest is unique) joined to the user, of the
    columns it needs: plain rows, no ORM objects (every request pays for this)."""
    digest = hash_token(token)
    row = db.execute(_LOOKUP, {"digest": digest}).first()
    if row is None or row.revoked or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = utcnow()
    if row.expires_at is not None and as_utc(row.expires_at) <= now:
        return None
    if row.role != "worker" and (row.user_id is None or row.name is None or row.disabled):
        return None
    if row.last_used_at is None or now - as_utc(row.last_used_at) > LAST_USED_EVERY:
        db.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        db.commit()
    return Principal(
        token_id=row.id,
        role=row.role,
        user_id=row.user_id,
        user_name=row.name,
        scopes=frozenset(row.scopes or ()),
        job_id=row.job_id,
    )


def revoke_worker_tokens(db: Session, job_id: int) -> None:
    """A job's worker tokens stop working (its attempt ended, or a new one starts); in the
    caller's transaction."""
    db.execute(
        update(ApiToken)
        .where(ApiToken.job_id == job_id, ApiToken.role == "worker", ApiToken.revoked.is_(False))
        .values(revoked=True)
    )


def ensure_admin_token(db: Session, home: Path, configured: str | None) -> Path | None:
    """The first admin's token. NESTOR_ADMIN_TOKEN, if set, is registered as an admin token
    (and a previously configured one that differs is revoked: changing the variable changes
    the token); otherwise on first start a token is made and written to HOME/admin_token
    (mode 0600). Returns the file holding the token, or None when it came from the
    environment."""
    admin = admin_user(db)
    db.commit()
    if configured:
        digest = hash_token(configured)
        replaced = db.scalars(
            update(ApiToken)
            .where(
                ApiToken.configured.is_(True),
                ApiToken.token_hash != digest,
                ApiToken.revoked.is_(False),
            )
            .values(revoked=True)
            .returning(ApiToken.id)
        ).all()
        for token_id in replaced:
            record(db, None, "token.revoke", f"token {token_id}", "NESTOR_ADMIN_TOKEN changed")
        db.commit()
        if db.scalar(select(ApiToken).where(ApiToken.token_hash == digest)) is None:
            create_token(
                db, "admin (NESTOR_ADMIN_TOKEN)", "admin", token=configured, configured=True
            )
            record(db, None, "token.create", "admin (NESTOR_ADMIN_TOKEN)", "at start")
            db.commit()
        return None
    path = home / "admin_token"
    if path.exists() and lookup(db, path.read_text().strip()) is not None:
        return path
    token = create_token(db, "admin", "user", user_id=admin.id, scopes=ALL_SCOPES)
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path
