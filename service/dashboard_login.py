"""The dashboard's sign-in page: its paths, its HTML and the Content-Security-Policy it is
served with (service.dashboard serves it)."""

from __future__ import annotations

import html

from service.dashboard_sessions import Viewer

LOGIN_PATH = "/dashboard/login"
LOGOUT_PATH = "/dashboard/logout"

LOGIN_CSP = (b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
             b"frame-ancestors 'none'; base-uri 'none'")


def login_html(message: str, next_path: str, viewer: Viewer | None, ttl_s: int) -> str:
    e = html.escape
    note = f'<p class="error" role="alert">{e(message)}</p>' if message else ""
    who = ""
    if viewer is not None:
        role = "admin: every owner's jobs" if viewer.is_admin else "your jobs"
        who = (f'<p>Signed in as <b>{e(viewer.owner)}</b> ({role}). '
               f'<a href="/dashboard">Open the dashboard</a></p>'
               f'<form method="post" action="{LOGOUT_PATH}"><button type="submit">Sign out'
               f'</button></form><hr>')
    hours = f"{ttl_s / 3600:g} h" if ttl_s >= 3600 else f"{ttl_s // 60} min"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hptune dashboard: sign in</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 32rem; margin: 4rem auto;
       padding: 0 1rem; color: #222; }}
input[type=password] {{ width: 100%; padding: .5rem; font: inherit; box-sizing: border-box; }}
button {{ margin-top: .75rem; padding: .5rem 1.25rem; font: inherit; }}
.error {{ color: #b00020; }} .hint {{ color: #555; font-size: .9rem; }}
</style></head>
<body><main>
<h1>hptune dashboard</h1>
{note}{who}
<form method="post" action="{LOGIN_PATH}">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{e(next_path)}">
<button type="submit">Sign in</button>
</form>
<p class="hint">Any hptune API key signs in: an owner's key shows that owner's jobs, an admin
key every job. The dashboard is read-only. The key is sent once; the browser keeps a session
cookie for {hours}.</p>
</main></body></html>
"""
