"""optuna-dashboard inside the API process, at /dashboard, for admin keys only."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import anyio
from a2wsgi import WSGIMiddleware

from service.db import Database
from service.errors import Unauthorized
from service.keys import authenticate

# optuna-dashboard's single-page app asks for absolute paths, so these prefixes are its own.
DASHBOARD_PREFIXES = ("/dashboard", "/static/", "/api/", "/csv/", "/favicon.ico")
LOGIN_PATH = "/dashboard/login"
COOKIE = "hptune_dashboard_key"


def is_dashboard_path(path: str) -> bool:
    return path.startswith(DASHBOARD_PREFIXES) and not path.startswith("/api/v1/")


class DashboardGate:
    """Routes dashboard paths to optuna-dashboard after checking for an admin key.

    A browser cannot send a bearer header by itself, so `GET /dashboard/login?key=...` (or a
    form POST) stores the key in an HttpOnly cookie and redirects to the dashboard.
    """

    def __init__(self, app: Any, db: Database) -> None:
        self.app = app
        self.db = db
        self._dashboard: Any = None

    def _wsgi(self) -> Any:
        if self._dashboard is None:
            import optuna_dashboard

            self._dashboard = WSGIMiddleware(optuna_dashboard.wsgi(self.db.storage))
        return self._dashboard

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        if scope["path"].rstrip("/") == LOGIN_PATH:
            query = parse_qs(scope.get("query_string", b"").decode())
            await self._login(query.get("key", [""])[0], query.get("next", [""])[0], send)
            return
        key = _bearer(headers.get("authorization", "")) or _cookie(headers.get("cookie", ""))
        status = await anyio.to_thread.run_sync(self._check, key)
        if status == 401:
            await _json(send, 401, "the dashboard needs an admin API key: open "
                        f"{LOGIN_PATH}?key=<admin key> or send 'Authorization: Bearer <key>'",
                        [(b"www-authenticate", b"Bearer")])
            return
        if status == 403:
            await _json(send, 403, "the dashboard is for admin keys only")
            return
        await self._wsgi()(scope, receive, send)

    def _check(self, key: str | None) -> int:
        if not key:
            return 401
        try:
            with self.db.session() as s:
                row = authenticate(s, key)
                return 200 if row.is_admin else 403
        except Unauthorized:
            return 401

    async def _login(self, key: str, next_path: str, send: Any) -> None:
        """Set the cookie and go to `next_path` (a dashboard page, e.g. a job's study
        `/dashboard/studies/<n>`; anything else goes to the dashboard's start page)."""
        status = await anyio.to_thread.run_sync(self._check, key)
        if status != 200:
            await _json(send, status, "not an admin API key")
            return
        target = next_path if _local_dashboard_path(next_path) else "/dashboard"
        cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", target.encode()),
                                (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def _local_dashboard_path(path: str) -> bool:
    """A path on this server under /dashboard (no scheme, host or `//`: no open redirect)."""
    return (path.startswith("/dashboard/") and "//" not in path and "\\" not in path
            and path.isascii() and path.isprintable())


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _cookie(value: str) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(value)
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


async def _json(send: Any, status: int, detail: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail, "errors": []}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
