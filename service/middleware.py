"""ASGI middleware: request body limits, authentication before any body is read, and the
security headers every response carries."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
from sqlalchemy.exc import DBAPIError

from service.errors import DatabaseUnavailable, Unauthorized

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

DISCONNECT = {"type": "http.disconnect"}


class BodyLimit:
    """Bound every request body by size and by the time between its chunks.

    `limit_for(path)` gives the limit in bytes (uploads get a larger one). A declared
    Content-Length above it is refused at once; every body is counted as it streams, whatever
    it declared, so neither a false Content-Length nor a chunked body gets past the limit, and
    nothing is buffered here. A request declaring both Content-Length and Transfer-Encoding is
    ambiguous (a smuggling vector) and refused. A body that stalls for `idle_timeout_s` between
    chunks answers 408. Once this middleware has answered, the app reads a disconnect and
    whatever it sends is dropped.
    """

    def __init__(self, app: Any, limit_for: Callable[[str], int], idle_timeout_s: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = scope.get("headers") or []
        lengths = {v for k, v in headers if k == b"content-length"}
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if lengths and chunked:
            await reply(send, 400, "Content-Length and Transfer-Encoding must not be combined")
            return
        if len(lengths) > 1:
            await reply(send, 400, "conflicting Content-Length headers")
            return
        if lengths:
            try:
                declared = int(next(iter(lengths)))
            except ValueError:
                declared = -1
            if declared < 0:
                await reply(send, 400, "invalid Content-Length header")
                return
            if declared > limit:
                await reply(send, 413, f"request body larger than {limit} bytes")
                return
            limit = declared
        state = {"seen": 0, "answered": False, "started": False, "complete": False}

        async def answer(status: int, detail: str) -> dict[str, Any]:
            if not state["started"]:
                state["answered"] = True
                await reply(send, status, detail)
            return DISCONNECT

        async def guarded_receive() -> dict[str, Any]:
            if state["answered"]:
                return DISCONNECT
            if state["complete"]:  # the body is in: what is left is waiting for a disconnect
                return await receive()
            with anyio.move_on_after(self.idle_timeout_s) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                return await answer(408, f"request body stalled for {self.idle_timeout_s:g} s")
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    return await answer(413, f"request body larger than {limit} bytes")
                state["complete"] = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["answered"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


class ApiKeyGate:
    """Authenticate `/api/v1/` requests (and admin-only paths) before anything reads the body.

    FastAPI parses a request's body before it resolves dependencies, so a dependency alone
    would let an anonymous client make the server parse JSON or spool a multipart upload to
    disk. The key found is left in `scope["state"]["api_key"]` for the routes' dependency.
    `authenticate(key)` returns the key's row or raises Unauthorized; it runs in a thread.
    `known(key)`, if given, returns the row of a key verified moments ago, or None, without
    touching the database: it runs first, in the event loop, and spares a hit the thread.
    """

    def __init__(self, app: Any, authenticate: Callable[[str], Any],
                 admin_paths: tuple[str, ...] = (),
                 known: Callable[[str], Any | None] | None = None) -> None:
        self.app = app
        self.authenticate = authenticate
        self.admin_paths = admin_paths
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        # Other methods on an admin path go on to the router, which answers 405.
        admin_only = path in self.admin_paths and scope.get("method") in ("GET", "HEAD")
        if scope["type"] != "http" or not (path.startswith("/api/v1/") or admin_only):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            await reply(send, 401, "missing API key: send 'Authorization: Bearer <key>'",
                        [(b"www-authenticate", b"Bearer")])
            return
        key = self.known(token) if self.known is not None else None
        try:
            if key is None:
                key = await anyio.to_thread.run_sync(self.authenticate, token)
        except Unauthorized as exc:
            await reply(send, 401, exc.message, [(b"www-authenticate", b"Bearer")])
            return
        except (DatabaseUnavailable, DBAPIError):
            await reply(send, 503, "database unavailable, try again shortly",
                        [(b"retry-after", b"5")])
            return
        if admin_only and not key.is_admin:
            await reply(send, 403, f"{path} is for admin keys only")
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def bearer_token(scope: Scope) -> str | None:
    """The token of the request's `Authorization: Bearer` header, if it has one."""
    for k, v in scope.get("headers") or []:
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# Sent with every response: no MIME sniffing, no framing, no Referer leaving the service.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Add SECURITY_HEADERS to every HTTP response that does not set them itself."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers") or []}
                message = {**message, "headers": [
                    *(message.get("headers") or []),
                    *((k, v) for k, v in SECURITY_HEADERS if k not in present)]}
            await send(message)

        await self.app(scope, receive, with_headers)


async def reply(send: Send, status: int, detail: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON error response in the API's error shape."""
    body = json.dumps({"detail": detail, "errors": []}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
