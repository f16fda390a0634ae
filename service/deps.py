"""Typed dependencies, so handlers read as plain functions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .auth import lookup
from .capacity import Capacity
from .models import ApiToken
from .settings import Settings


def get_db(request: Request) -> Iterator[Session]:
    yield from request.app.state.db.session()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_capacity(request: Request) -> Capacity | None:
    """The cluster's capacity when it cannot grow (the embedded one); None when unknown or
    growable (an API without a scheduler, an external cluster)."""
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None or not scheduler.cluster.embedded:
        return None
    return scheduler.capacity


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CapacityDep = Annotated[Capacity | None, Depends(get_capacity)]
_bearer = HTTPBearer(auto_error=False, description="a Nestor API token")


def authenticate(request: Request, authorization: str | None) -> ApiToken:
    """The token an ``Authorization`` header carries, looked up in a session of its own that
    is closed before the request goes on (a long response, such as a live stream, must not
    hold a pooled connection). 401 if it is missing, unknown or revoked."""
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
            "invalid or revoked token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token


def require_token(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiToken:
    """Every endpoint but /healthz: a valid, unrevoked bearer token (already checked by the
    request guard when the request has a body)."""
    checked = getattr(request.state, "token", None)
    if checked is not None:
        return checked
    return authenticate(request, request.headers.get("authorization"))


TokenDep = Annotated[ApiToken, Depends(require_token)]


def require_user(token: TokenDep) -> ApiToken:
    """Users and admins; worker tokens may only send metrics for their own job."""
    if token.role == "worker":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "worker tokens may only ingest metrics")
    return token


UserDep = Annotated[ApiToken, Depends(require_user)]
