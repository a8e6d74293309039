"""Which app a request comes from, so spend can be told apart per app (ledger, stats, budgets).

Pure: the request's headers and the name of the client token it authenticated with in, a name out.
The most explicit source wins: `X-Arbstr-App`, then what OpenRouter clients already send
(`X-Title`, then the host of `HTTP-Referer`), then the User-Agent's product token, then the token's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

MAX_APP_LENGTH = 128
"""The ledger's column width: longer names are cut, not refused (a label must never fail a request)."""
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


def app_of(header: Callable[[str], str | None], token_name: str | None = None) -> str | None:
    """The app a request is attributed to, or None when nothing names one.

    `header` looks a request header up by name, case-insensitively (mitmproxy's `Headers.get`);
    only the names in APP_HEADERS are asked for.
    """
    for name, read in _SOURCES:
        value = header(name)
        if value and (app := read(value)):
            return app
    return token_name


def _clean(value: str) -> str | None:
    return _UNPRINTABLE.sub(" ", value).strip()[:MAX_APP_LENGTH] or None


def _referrer_host(value: str) -> str | None:
    """An app's URL names the app by its host (`https://app.example/page?x` is `app.example`); a value
    that is no URL is kept as written."""
    try:
        host = urlsplit(value.strip()).hostname
    except ValueError:
        host = None
    return _clean(host or value)


def _product_token(value: str) -> str | None:
    """The first product's name: `curl/8.5.0` is `curl`, `OpenAI/Python 1.55.0` is `OpenAI`."""
    first = value.strip().split(None, 1)[0] if value.strip() else ""
    return _clean(first.split("/", 1)[0])


_SOURCES = (("x-arbstr-app", _clean), ("x-title", _clean), ("http-referer", _referrer_host),
            ("user-agent", _product_token))
"""Where the app's name is read from, most explicit first, with how each value names it."""
APP_HEADERS = frozenset(name for name, _ in _SOURCES)
"""The request headers `app_of` reads."""
