"""Typed dependencies, so handlers read as plain functions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .auth import Principal, lookup
from .capacity import Capacity, Resources
from .db import MAX_OVERFLOW, POOL_SIZE
from .settings import Settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A request's session, opened and closed on the event loop (see SessionDep)."""
    session = request.app.state.db.sessions()
    try:
        yield session
    finally:
        session.close()


async def get_settings(request: Request) -> Settings:  # no I/O: no thread-pool hop
    return request.app.state.settings


def get_capacity(request: Request) -> Capacity | None:
    """The cluster's capacity when it cannot grow (the embedded one); None when unknown or
    growable (an API without a scheduler, an external cluster)."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None or not scheduler.cluster.embedded:
        return None
    return scheduler.capacity


def get_cluster(request: Request) -> Resources | None:
    """The cluster's total resources for the queue's estimates, fixed or not; None without a
    scheduler (an API alone) or while the cluster cannot be asked."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        return None
    try:
        return scheduler.capacity.total
    except Exception:  # Ray unreachable: the estimates wait, the read does not fail
        return None


# A request's session holds a pooled connection from its first query until it closes. FastAPI
# serializes a sync endpoint's response in the thread pool, so a session that lived until
# after the response made a cycle under a burst of requests (forty job pages opening at
# once): every pool thread waited for a connection that only a serialization queued behind
# them would free, and requests failed after the pool's 30 s timeout. So at most
# SESSION_LIMIT sessions are open at once, fewer than the pool's connections (a request past
# the limit waits on the event loop, holding neither a thread nor a connection), and each
# closes when its endpoint's response is built, before the body is sent (a download or a
# stream holds none).
SESSION_LIMIT = POOL_SIZE + MAX_OVERFLOW - 5
SessionDep = Annotated[Session, Depends(get_db, scope="function", max_concurrency=SESSION_LIMIT)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CapacityDep = Annotated[Capacity | None, Depends(get_capacity)]
ClusterDep = Annotated[Resources | None, Depends(get_cluster)]
_bearer = HTTPBearer(auto_error=False, description="a Nestor API token")


def authenticate(request: Request, authorization: str | None) -> Principal:
    """The principal an ``Authorization`` header's token stands for, looked up in a session
    of its own that is closed before the request goes on (a long response, such as a live
    stream, must not hold a pooled connection). 401 if it is missing, unknown, revoked,
    expired or its user is disabled."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with request.app.state.db.sessions() as db:
        token = lookup(db, secret.strip())
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid, revoked or expired token (or its user is disabled)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token


async def require_token(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Every endpoint but /healthz: a valid bearer token (already checked by the request
    guard when the request has a body). Async, so that a request pays a thread-pool hop
    only for the database lookup, not for reading what the guard found."""
    checked = getattr(request.state, "token", None)
    if checked is not None:
        return checked
    return await run_in_threadpool(authenticate, request, request.headers.get("authorization"))


TokenDep = Annotated[Principal, Depends(require_token)]


class Scope:
    """A route's rule: the scope its caller's token must have (``"worker"``: a worker token,
    for ingest; ``"user"``: any user's token, whatever its scopes). 403 names the missing
    scope. The permission tests read these off the routes, so a route without one fails
    them."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    async def __call__(self, token: TokenDep) -> Principal:  # pure: runs on the event loop
        return self.check(token)

    def check(self, token: Principal) -> Principal:
        if self.scope == "worker":
            if token.role != "worker" and not token.admin:
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN, "only a job's worker token may send its metrics"
                )
            return token
        if token.role == "worker":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "worker tokens may only ingest metrics")
        if self.scope == "user":  # any user's token: their own tokens, who they are
            return token
        if not token.has(self.scope):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this token lacks the {self.scope!r} scope (it has: "
                f"{', '.join(sorted(token.scopes)) or 'none'})",
            )
        return token

    def __repr__(self) -> str:
        return f"Scope({self.scope!r})"


ReadDep = Annotated[Principal, Depends(Scope("read"))]
SubmitDep = Annotated[Principal, Depends(Scope("submit"))]
CodeDep = Annotated[Principal, Depends(Scope("code"))]
AdminDep = Annotated[Principal, Depends(Scope("admin"))]
WorkerDep = Annotated[Principal, Depends(Scope("worker"))]
AnyUserDep = Annotated[Principal, Depends(Scope("user"))]


def require_owner(token: Principal, owner_id: int | None, what: str) -> None:
    """403 unless the token's user owns ``what`` or is an admin."""
    if not token.owns(owner_id):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"{what} belongs to another user; only its owner or an admin may change it",
        )


def wake_scheduler(request: Request) -> None:
    """Tell this process's scheduler, if it has one, that a job was queued."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is not None:
        scheduler.wake()
