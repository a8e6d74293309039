"""The dashboard: one page and its files, shipped in the package, and how a browser signs in.

The page reads the same JSON API as any client. A browser cannot send `Authorization: Bearer`
when it opens a page, so when `[server] auth_token` (or a named client token) is set, the page
asks for the token once (a form posted to /dashboard, or a `?token=` link) and arbstr answers
with a session cookie: HttpOnly (no script can read it), SameSite=Strict (no other site's page
can send it), holding an HMAC of the token rather than the token. The cookie is accepted for GET
requests to arbstr's own read-only endpoints only, never for chat completions, so it can read
the ledger but never spend a sat.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from functools import cache
from http.cookies import CookieError, SimpleCookie
from importlib import resources

from arbstr.config import ServerConfig

PAGE = "/dashboard"
COOKIE = "arbstr_session"
SESSION_DAYS = 30
ASSETS = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/dashboard/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
    "/dashboard/uPlot.LICENSE": ("uPlot.LICENSE", "text/plain; charset=utf-8"),
}
"""The page and everything it loads, by path: nothing comes from anywhere else."""
SECURITY_HEADERS = {
    # Only this arbstr's own scripts, styles and API; no frame of it on another site.
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@cache
def asset(path: str) -> tuple[bytes, str] | None:
    """The content and content type of a dashboard file, or None."""
    if path not in ASSETS:
        return None
    name, content_type = ASSETS[path]
    return resources.files("arbstr").joinpath("static", name).read_bytes(), content_type


def _session_value(token: str) -> str:
    return hmac.new(token.encode(), b"arbstr dashboard session", hashlib.sha256).hexdigest()


def _known_tokens(server: ServerConfig) -> list[tuple[str, str]]:
    tokens = [("", server.auth_token.get_secret_value())] if server.auth_token is not None else []
    return tokens + [(t.name, t.token.get_secret_value()) for t in server.tokens]


def session_cookie(token: str) -> str:
    """The Set-Cookie value that signs a browser in with this (already checked) token."""
    return (f"{COOKIE}={_session_value(token)}; Path=/; Max-Age={SESSION_DAYS * 86400}; HttpOnly; "
            "SameSite=Strict")


def session_token_name(server: ServerConfig, cookie_header: str) -> str | None:
    """The name of the token behind the session cookie ("" for auth_token), or None without a valid one.
    Every token is compared, in constant time each."""
    try:
        cookies = SimpleCookie(cookie_header)
    except CookieError:
        return None
    sent = cookies[COOKIE].value if COOKIE in cookies else ""
    matched = None
    for name, token in _known_tokens(server):
        if hmac.compare_digest(sent.encode(), _session_value(token).encode()):
            matched = name
    return matched


def login_page(message: str = "") -> bytes:
    """What /dashboard shows a browser without a session: a form that posts the token once."""
    note = f'<p class="err">{html.escape(message, quote=False)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>arbstr: sign in</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/dashboard/dashboard.css"></head>
<body><main><section class="card wide"><h1>arbstr</h1>
<p>This arbstr has an auth token (<code>[server] auth_token</code>). Enter it once: the browser keeps a
session cookie for {SESSION_DAYS} days that can read this dashboard and nothing else.</p>{note}
<form method="post" action="{PAGE}"><label>token <input type="password" name="token" autocomplete="current-password"
autofocus required></label> <button type="submit">Open the dashboard</button></form>
</section></main></body></html>""".encode()
