"""The request guard: a request that carries a body is authenticated before a byte of the
body is read, and the body is counted as it arrives, so neither a missing token nor a
missing or false Content-Length (chunked uploads) lets a client grow the server's memory.

FastAPI's own ``max_body_size`` counts bytes too, but answers in plain text and only after an
unauthenticated caller's body has started to arrive; this answers JSON like every other error.
"""

from __future__ import annotations

import anyio
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import authenticate


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes (NESTOR_MAX_BODY_BYTES)")


class RequestGuard:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        request = Request(scope)
        length = request.headers.get("content-length")
        try:
            # Synchronous database work stays off the event loop.
            token = await anyio.to_thread.run_sync(
                authenticate, request, request.headers.get("authorization")
            )
            if length is not None and int(length) > limit:
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
                if received > limit:
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
