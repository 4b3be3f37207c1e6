"""optuna-dashboard behind a login: every key sees its owner's studies (an admin every study),
read-only, inside the API at /dashboard and as `hptune dashboard`."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
from a2wsgi import WSGIMiddleware
from sqlalchemy.exc import DBAPIError

from service.dashboard_login import LOGIN_CSP, LOGIN_PATH, LOGOUT_PATH, login_html
from service.dashboard_sessions import (
    Viewer,
    create_session,
    end_session,
    key_viewer,
    session_viewer,
)
from service.dashboard_storage import ScopedReadOnlyStorage
from service.db import Database
from service.errors import DatabaseUnavailable, Unauthorized
from service.middleware import reply
from service.trial_store import owner_has_study, trial_study_id

# optuna-dashboard's single-page app asks for absolute paths, so these prefixes are its own.
DASHBOARD_PREFIXES = ("/dashboard", "/static/", "/api/", "/csv/", "/favicon.ico")
COOKIE = "hptune_session"
# The cookie of earlier versions, which held the raw key: cleared wherever it still shows up.
LEGACY_COOKIE = "hptune_dashboard_key"
# Methods that reach optuna-dashboard; through the service it is read-only for everyone.
READ_METHODS = ("GET", "HEAD")
# The login form's body: a key and a path fit in far less.
LOGIN_BODY_LIMIT = 8 * 1024
# One optuna-dashboard app per owner looking (each reads through that owner's storage); the
# least recently used goes when more owners than this look at once.
MAX_SCOPED_APPS = 64
# Where the gate leaves the request's viewer in the ASGI scope; the WSGI side reads it from
# a2wsgi's environ["asgi.scope"] in the thread that runs optuna-dashboard.
SCOPE_KEY = "hptune.dashboard_viewer"

# Paths that name a study (or a trial) by id, in optuna-dashboard's routes and its app's pages.
_STUDY_PATH = re.compile(r"^/(?:api/studies|csv|dashboard/studies|api/artifacts|artifacts)"
                         r"/(-?\d+)(?:/|$)")
_TRIAL_PATH = re.compile(r"^/api/trials/(-?\d+)(?:/|$)")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
# Study and trial ids are database integers.
MAX_DB_ID = 2**31 - 1

Scope = dict[str, Any]


def is_dashboard_path(path: str) -> bool:
    return path.startswith(DASHBOARD_PREFIXES) and not path.startswith("/api/v1/")


class DashboardGate:
    """Routes dashboard paths to optuna-dashboard for a logged-in viewer, read-only.

    A browser logs in by POSTing a key to /dashboard/login and gets a session cookie (the key
    itself is never stored, nor put in a URL); scripts send `Authorization: Bearer <key>`.
    Writes answer 405, another owner's study 404, before optuna-dashboard sees the request.
    """

    def __init__(self, app: Any, db: Database, max_scoped_apps: int = MAX_SCOPED_APPS) -> None:
        self.app = app
        self.db = db
        self._apps = ScopedDashboards(db, max_scoped_apps)
        self._wsgi = WSGIMiddleware(self._apps)

    @property
    def session_seconds(self) -> int:
        return self.db.settings.dashboard_session_seconds

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            await self._dispatch(scope, receive, send)
        except (DatabaseUnavailable, DBAPIError):
            await reply(send, 503, "database unavailable, try again shortly",
                        [(b"retry-after", b"5")])

    async def _dispatch(self, scope: Scope, receive: Any, send: Any) -> None:
        path, method = scope["path"], scope["method"]
        route = path.rstrip("/")
        if route == LOGIN_PATH:
            if method in READ_METHODS:
                await self._login_page(scope, send)
            elif method == "POST":
                await self._login(scope, receive, send)
            else:
                await reply(send, 405, "use GET or POST", [(b"allow", b"GET, HEAD, POST")])
            return
        if route == LOGOUT_PATH:
            if method == "POST":
                await self._logout(scope, send)
            else:
                await reply(send, 405, "log out with a POST", [(b"allow", b"POST")])
            return
        if method not in READ_METHODS:
            await reply(send, 405, "the dashboard is read-only", [(b"allow", b"GET, HEAD")])
            return
        viewer = await anyio.to_thread.run_sync(self._viewer, scope)
        if viewer is None:
            if _is_page(path):
                target = _request_target(scope)
                login = LOGIN_PATH + (f"?next={quote(target, safe='/')}"
                                      if _local_dashboard_path(target) else "")
                await _redirect(send, login)
                return
            await reply(send, 401, "the dashboard needs a login: a browser opens "
                        f"{LOGIN_PATH}; a script sends 'Authorization: Bearer <key>'",
                        [(b"www-authenticate", b"Bearer")])
            return
        if not await anyio.to_thread.run_sync(self._may_see_path, viewer, path):
            await reply(send, 404, "not found")
            return
        await self._wsgi({**scope, SCOPE_KEY: viewer}, receive, send)

    def _viewer(self, scope: Scope) -> Viewer | None:
        token = _bearer(scope)
        if token is not None:
            try:
                return key_viewer(self.db, token)
            except Unauthorized:
                return None
        session_id = _cookie(scope, COOKIE)
        if session_id is None or not _SESSION_ID.match(session_id):
            return None
        return session_viewer(self.db, session_id)

    def _may_see_path(self, viewer: Viewer, path: str) -> bool:
        """False when `path` names a study or trial outside the viewer's own (or an id no
        database integer holds, which would otherwise reach the driver)."""
        match = _STUDY_PATH.match(path) or _TRIAL_PATH.match(path)
        if match is None:
            return True
        id_ = int(match.group(1))
        if not 0 < id_ <= MAX_DB_ID:
            return False
        if viewer.is_admin:
            return True
        if match.re is _TRIAL_PATH:
            study_id = trial_study_id(self.db, id_)
            return study_id is not None and owner_has_study(self.db, viewer.owner, study_id)
        return owner_has_study(self.db, viewer.owner, id_)

    async def _login_page(self, scope: Scope, send: Any, status: int = 200,
                          message: str = "", next_path: str | None = None) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if status == 200 and "key" in query:
            # A key in a URL lands in logs, history and Referer headers: never accept it there.
            await reply(send, 400, f"never put an API key in a URL: POST it to {LOGIN_PATH} as "
                        "the form field 'key' (application/x-www-form-urlencoded)")
            return
        if next_path is None:
            next_path = query.get("next", [""])[0]
        viewer = None
        if status == 200:
            session_id = _cookie(scope, COOKIE)
            if session_id and _SESSION_ID.match(session_id):
                viewer = await anyio.to_thread.run_sync(session_viewer, self.db, session_id)
        body = login_html(message, next_path if _local_dashboard_path(next_path) else "",
                           viewer, self.session_seconds).encode()
        headers = [(b"content-type", b"text/html; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"),
                   (b"content-security-policy", LOGIN_CSP),
                   *_clear_legacy(scope)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    async def _login(self, scope: Scope, receive: Any, send: Any) -> None:
        """Check the form's key, start a session, and go to `next` (a dashboard page, e.g. a
        job's study `/dashboard/studies/<n>`; anything else goes to the start page)."""
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            await reply(send, 415, "send the login form as application/x-www-form-urlencoded "
                        "with the field 'key'")
            return
        raw = await _read_body(receive, LOGIN_BODY_LIMIT)
        if raw is None:
            await reply(send, 413, f"login form larger than {LOGIN_BODY_LIMIT} bytes")
            return
        try:
            form = parse_qs(raw.decode("utf-8"), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            await reply(send, 400, "unreadable login form")
            return
        key = form.get("key", [""])[0].strip()
        next_path = form.get("next", [""])[0]
        if not key:
            await self._login_page(scope, send, 400, "Enter an API key.", next_path)
            return
        try:
            session_id, _viewer, _expires = await anyio.to_thread.run_sync(
                create_session, self.db, key, self.session_seconds)
        except Unauthorized:
            await self._login_page(scope, send, 401, "That key is unknown or revoked.",
                                   next_path)
            return
        target = next_path if _local_dashboard_path(next_path) else "/dashboard"
        cookie = _session_cookie(scope, session_id, self.session_seconds)
        await _redirect(send, target, [(b"set-cookie", cookie), *_clear_legacy(scope)])

    async def _logout(self, scope: Scope, send: Any) -> None:
        session_id = _cookie(scope, COOKIE)
        if session_id and _SESSION_ID.match(session_id):
            await anyio.to_thread.run_sync(end_session, self.db, session_id)
        await _redirect(send, LOGIN_PATH,
                        [(b"set-cookie", _session_cookie(scope, "", 0)), *_clear_legacy(scope)])


class ScopedDashboards:
    """A WSGI app that hands each request to optuna-dashboard over its viewer's storage.

    One optuna-dashboard app per scope (an owner, or None for admins), kept in a bounded LRU:
    each app's storage is fixed at creation, so concurrent requests of different owners never
    share one. The viewer comes from the request's own environ, never from shared state; a
    request without one is refused.
    """

    def __init__(self, db: Database, max_apps: int = MAX_SCOPED_APPS) -> None:
        if max_apps < 1:
            raise ValueError(f"max_apps must be at least 1, got {max_apps}")
        self.db = db
        self.max_apps = max_apps
        self._apps: OrderedDict[str | None, Callable[..., Any]] = OrderedDict()
        self._lock = threading.Lock()

    def app_for(self, scope: str | None) -> Callable[..., Any]:
        with self._lock:
            app = self._apps.get(scope)
            if app is None:
                import optuna_dashboard

                app = optuna_dashboard.wsgi(ScopedReadOnlyStorage(self.db.storage, self.db,
                                                                  scope))
                self._apps[scope] = app
                while len(self._apps) > self.max_apps:
                    self._apps.popitem(last=False)
            else:
                self._apps.move_to_end(scope)
            return app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        viewer = (environ.get("asgi.scope") or {}).get(SCOPE_KEY)
        if not isinstance(viewer, Viewer):
            body = b'{"detail": "no dashboard viewer", "errors": []}'
            start_response("403 Forbidden", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return self.app_for(viewer.scope)(environ, start_response)


def create_dashboard_app(db: Database) -> Any:
    """The dashboard alone, as `hptune dashboard` serves it: the gate, and 404 for the rest
    (but /healthz, for container health checks)."""
    from service.middleware import SecurityHeaders

    async def rest(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await anyio.to_thread.run_sync(db.dispose)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            body = b'{"status": "ok"}'
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await reply(send, 404, "not found: the dashboard is at /dashboard")

    return SecurityHeaders(DashboardGate(rest, db))


def _is_page(path: str) -> bool:
    return path == "/dashboard" or path.startswith("/dashboard/")


def _request_target(scope: Scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    return scope["path"] + (f"?{query}" if query else "")


def _local_dashboard_path(path: str) -> bool:
    """A path on this server under /dashboard (no scheme, host or `//`: no open redirect)."""
    return (path.startswith("/dashboard/") and "//" not in path and "\\" not in path
            and path.isascii() and path.isprintable())


def _session_cookie(scope: Scope, value: str, max_age: int) -> bytes:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    return (f"{COOKIE}={value}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{secure}"
            ).encode()


def _clear_legacy(scope: Scope) -> list[tuple[bytes, bytes]]:
    if _cookie(scope, LEGACY_COOKIE) is None:
        return []
    return [(b"set-cookie", f"{LEGACY_COOKIE}=; HttpOnly; Path=/; Max-Age=0".encode())]


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k == name:
            return v.decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _cookie(scope: Scope, name: str) -> str | None:
    """The value of cookie `name`. Parsed by hand: one malformed cookie of another app on the
    same host must not hide ours (SimpleCookie stops at the first it cannot read)."""
    for k, v in scope.get("headers") or []:
        if k != b"cookie":
            continue
        for part in v.decode("latin-1").split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip().strip('"')
    return None


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _redirect(send: Any, location: str,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"content-length", b"0"),
                            (b"cache-control", b"no-store"), *(extra or [])]})
    await send({"type": "http.response.body", "body": b""})
