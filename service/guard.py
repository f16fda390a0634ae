"""The request guard: a request that carries a body is authenticated before a byte of the
body is read, and the body is counted as it arrives, so neither a missing token nor a
missing or false Content-Length (chunked uploads) lets a client grow the server's memory.

FastAPI's own ``max_body_size`` counts bytes too, but answers in plain text and only after an
unauthenticated caller's body has started to arrive; this answers JSON like every other error.
One limit holds for every body (NESTOR_MAX_BODY_BYTES) but those of the routes given their
own (code package uploads: NESTOR_MAX_PACKAGE_BYTES).
"""

from __future__ import annotations

from typing import NamedTuple

import anyio
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import authenticate


class BodyLimit(NamedTuple):
    size: int
    setting: str  # the environment variable that sets it, named in the 413


class BodyTooLarge(HTTPException):
    def __init__(self, limit: BodyLimit) -> None:
        super().__init__(413, f"request body over {limit.size} bytes ({limit.setting})")


class RequestGuard:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        route_limits: dict[tuple[str, str], BodyLimit] | None = None,
    ) -> None:
        """``route_limits``: (method, path) -> the limit of that route's bodies instead."""
        self.app = app
        self.limit = BodyLimit(max_body_bytes, "NESTOR_MAX_BODY_BYTES")
        self.route_limits = route_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        limit = self.route_limits.get((scope["method"], scope["path"]), self.limit)
        request = Request(scope)
        length = request.headers.get("content-length")
        try:
            # Synchronous database work stays off the event loop.
            token = await anyio.to_thread.run_sync(
                authenticate, request, request.headers.get("authorization")
            )
            if length is not None and int(length) > limit.size:
                raise BodyTooLarge(limit)
        except HTTPException as e:
            return await _error(e, scope, send)
        except ValueError:
            return await _error(HTTPException(400, "bad Content-Length"), scope, send)
        scope.setdefault("state", {})["token"] = token
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.size:
                    raise BodyTooLarge(limit)  # FastAPI re-raises HTTPExceptions from here
            return message

        await self.app(scope, counted, send)


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (length is not None and length.strip() != b"0")


async def _error(exc: HTTPException, scope: Scope, send: Send) -> None:
    """Answer without reading the body; the server closes the connection afterwards."""
    headers = {**(exc.headers or {}), "Connection": "close"}
    response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)
