"""Bearer tokens: random secrets shown once, stored as SHA-256 digests."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiToken


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "nst_" + secrets.token_urlsafe(32)


def create_token(
    db: Session, name: str, role: str, job_id: int | None = None, token: str | None = None
) -> str:
    """Store a token's digest and return the token itself (the only time it is seen)."""
    token = token or new_token()
    db.add(ApiToken(name=name, token_hash=hash_token(token), role=role, job_id=job_id))
    db.commit()
    return token


def lookup(db: Session, token: str) -> ApiToken | None:
    digest = hash_token(token)
    row = db.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked or not hmac.compare_digest(row.token_hash, digest):
        return None
    return row


def ensure_admin_token(db: Session, home: Path, configured: str | None) -> Path | None:
    """On first start, create the admin token and write it to HOME/admin_token (mode 0600);
    NESTOR_ADMIN_TOKEN, if set, is registered as the admin token instead. Returns the file
    holding the token, or None when it came from the environment."""
    if configured:
        if lookup(db, configured) is None:
            create_token(db, "admin (NESTOR_ADMIN_TOKEN)", "admin", token=configured)
        return None
    path = home / "admin_token"
    existing = db.scalar(
        select(ApiToken).where(ApiToken.role == "admin", ApiToken.revoked.is_(False))
    )
    if existing is not None and path.exists():
        return path
    token = create_token(db, "admin", "admin")
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path
