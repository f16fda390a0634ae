"""The audit log: who submitted, cancelled, retried, created or revoked what, and when.
Append-only: rows are only ever added, in the same transaction as what they record."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.orm import Session

from .auth import Principal
from .models import Audit


def record(
    db: Session, who: Principal | None, action: str, target: str, detail: str | None = None
) -> None:
    """Add an audit row to ``db``'s transaction (the caller commits). A plain INSERT, not
    an ORM object: nothing reads the row back, and the unit of work's bookkeeping would be
    most of the cost of the request that records it."""
    db.execute(
        insert(Audit).values(
            user_id=who.user_id if who else None,
            token_id=who.token_id if who else None,
            action=action,
            target=target,
            detail=detail[:2000] if detail else None,
        )
    )
