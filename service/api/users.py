"""/v1/users (admins), /v1/tokens (everyone's own), /v1/me and /v1/audit (admins).

A user's first token comes back once, when the admin creates the user; a user makes more
tokens for themselves, each with scopes (at most their own) and maybe an expiry, and revokes
them. Disabling a user stops all of their tokens at once. Secrets are never shown again:
only their digests are stored.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..audit import record
from ..auth import ALL_SCOPES, create_token, hash_token
from ..deps import AdminDep, AnyUserDep, SessionDep
from ..models import ApiToken, Audit, User, utcnow
from ..schemas import UtcDatetime

ScopeName = Literal["read", "submit", "code", "admin"]
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
DEFAULT_SCOPES: list[ScopeName] = ["read", "submit"]

users = APIRouter(prefix="/v1/users", tags=["users"])
tokens = APIRouter(prefix="/v1/tokens", tags=["users"])
me = APIRouter(prefix="/v1/me", tags=["users"])
audit = APIRouter(prefix="/v1/audit", tags=["users"])


# ---------------------------------------------------------------------- schemas
class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    scopes: list[ScopeName] = Field(
        default_factory=lambda: list(DEFAULT_SCOPES), description="of the first token"
    )


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disabled: bool


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: UtcDatetime
    disabled: bool


class UserCreated(UserPublic):
    token: str = Field(description="the user's first token: shown this once only")
    token_id: int


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("token", min_length=1, max_length=200)
    scopes: list[ScopeName] = Field(default_factory=lambda: list(DEFAULT_SCOPES), min_length=1)
    expires_in_days: float | None = Field(
        None, gt=0, le=3650, allow_inf_nan=False, description="none: never expires"
    )


class TokenPublic(BaseModel):
    id: int
    name: str
    user: str | None
    scopes: list[str]
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None
    expires_at: UtcDatetime | None
    revoked: bool


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret: shown this once only")


class Me(BaseModel):
    user_id: int | None
    user: str | None
    token_id: int
    scopes: list[str]


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    time: UtcDatetime
    user: str | None
    token_id: int | None
    action: str
    target: str | None
    detail: str | None


# ---------------------------------------------------------------------- helpers
def _token_public(row: ApiToken, user: str | None) -> TokenPublic:
    return TokenPublic(
        id=row.id,
        name=row.name,
        user=user,
        scopes=list(row.scopes or []),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        expires_at=row.expires_at,
        revoked=row.revoked,
    )


def _expiry(days: float | None) -> datetime | None:
    return utcnow() + timedelta(days=days) if days else None


# ---------------------------------------------------------------------- users
@users.post("", status_code=status.HTTP_201_CREATED, response_model=UserCreated)
def create_user(body: UserCreate, db: SessionDep, token: AdminDep) -> UserCreated:
    """A new user and their first token (in ``token``, shown once); 409 if the name is
    taken."""
    user = User(name=body.name)
    db.add(user)
    try:
        db.flush()
    except IntegrityError:
        db.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"a user named {body.name!r} already exists"
        ) from None
    record(db, token, "user.create", f"user {user.id}", user.name)
    secret = create_token(db, "first token", "user", user_id=user.id, scopes=list(body.scopes))
    token_id = db.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(secret)))
    public = UserPublic.model_validate(user).model_dump()
    return UserCreated(**public, token=secret, token_id=token_id)


@users.get("", response_model=list[UserPublic])
def list_users(db: SessionDep, _: AdminDep) -> list[User]:
    return list(db.scalars(select(User).order_by(User.id)))


@users.patch("/{user_id}", response_model=UserPublic)
def update_user(user_id: Id, body: UserUpdate, db: SessionDep, token: AdminDep) -> User:
    """Disable (or enable again) a user: their tokens stop (or start) working at once."""
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user_id} not found")
    if user.id == token.user_id and body.disabled:
        raise HTTPException(status.HTTP_409_CONFLICT, "an admin cannot disable themselves")
    user.disabled = body.disabled
    record(db, token, "user.disable" if body.disabled else "user.enable", f"user {user_id}")
    db.commit()
    return user


# ---------------------------------------------------------------------- tokens
@tokens.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_own_token(body: TokenCreate, db: SessionDep, token: AnyUserDep) -> TokenCreated:
    """A new token for the caller's user, with at most the caller's scopes; its secret is
    in ``token``, shown once."""
    beyond = sorted(s for s in set(body.scopes) if not token.has(s))
    if beyond:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"a token cannot grant scopes its maker lacks: {', '.join(beyond)}",
        )
    scopes = sorted(set(body.scopes), key=ALL_SCOPES.index)
    secret = create_token(
        db,
        body.name,
        "user",
        user_id=token.user_id,
        scopes=scopes,
        expires_at=_expiry(body.expires_in_days),
    )
    row = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
    record(db, token, "token.create", f"token {row.id}", f"{body.name}: {', '.join(scopes)}")
    db.commit()
    return TokenCreated(**_token_public(row, token.user_name).model_dump(), token=secret)


@tokens.get("", response_model=list[TokenPublic])
def list_tokens(
    db: SessionDep,
    token: AnyUserDep,
    all_users: Annotated[bool, Query(alias="all", description="every user's (admins)")] = False,
) -> list[TokenPublic]:
    """The caller's tokens (never their secrets); ``all=true``: every user's, for admins."""
    if all_users and not token.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token lacks the 'admin' scope")
    query = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
    if not all_users:
        query = query.where(ApiToken.user_id == token.user_id)
    rows = db.execute(query.order_by(ApiToken.id)).all()
    return [_token_public(row, name) for row, name in rows]


@tokens.delete("/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: Id, db: SessionDep, token: AnyUserDep) -> TokenPublic:
    """Revoke one of the caller's tokens (an admin: anyone's); it fails from the next
    request on."""
    row = db.get(ApiToken, token_id)
    if row is None or row.role != "user" or (row.user_id != token.user_id and not token.admin):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"token {token_id} not found")
    row.revoked = True
    record(db, token, "token.revoke", f"token {token_id}", row.name)
    db.commit()
    user = db.get(User, row.user_id) if row.user_id else None
    return _token_public(row, user.name if user else None)


@me.get("", response_model=Me)
def whoami(token: AnyUserDep) -> Me:
    """The caller: user, token and scopes (the dashboard hides what they cannot use)."""
    scopes = ALL_SCOPES if token.admin else sorted(token.scopes, key=ALL_SCOPES.index)
    return Me(user_id=token.user_id, user=token.user_name, token_id=token.token_id, scopes=scopes)


# ---------------------------------------------------------------------- audit
@audit.get("", response_model=list[AuditPublic])
def list_audit(
    db: SessionDep,
    _: AdminDep,
    since_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditPublic]:
    """Who did what, oldest first after ``since_id``."""
    rows = db.execute(
        select(Audit, User.name)
        .outerjoin(User, User.id == Audit.user_id)
        .where(Audit.id > since_id)
        .order_by(Audit.id)
        .limit(limit)
    ).all()
    return [
        AuditPublic(
            id=a.id,
            time=a.time,
            user=name,
            token_id=a.token_id,
            action=a.action,
            target=a.target,
            detail=a.detail,
        )
        for a, name in rows
    ]
