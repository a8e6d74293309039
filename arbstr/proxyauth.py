"""Proxy authentication for regular (HTTPS_PROXY) mode when arbstr has client tokens.

A regular-mode listener routes whatever it is asked to: chat for `api.openai.com` (paid with the
user's sats) and any other host, loopback services included. With `auth_token` (or named
tokens) set, it therefore asks every client for one of them as proxy credentials before routing
anything: `HTTPS_PROXY=http://arbstr:<token>@127.0.0.1:8080` (any user name). This is
mitmproxy's own `proxyauth` addon (Basic credentials, checked once per CONNECT tunnel, the
`Proxy-Authorization` header removed once checked), with arbstr's tokens as its one validator,
limited to proxy modes (reverse mode has its own `Authorization: Bearer`), and answering 407
in OpenAI's error shape.
"""

from __future__ import annotations

import hmac

from mitmproxy import http
from mitmproxy.addons import proxyauth

from arbstr.config import ServerConfig
from arbstr.errors import ArbstrError

REALM = "arbstr"


class ProxyAuthRequired(ArbstrError):
    status = 407
    type = "invalid_request_error"
    code = "proxy_auth_required"


class TokenValidator(proxyauth.Validator):
    """Any user name; the password must be one of arbstr's client tokens (compared in constant time)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = [t.encode() for t in tokens]

    def __call__(self, username: str, password: str) -> bool:
        sent = password.encode()
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(sent, token)
        return matched


class TokenProxyAuth(proxyauth.ProxyAuth):
    """mitmproxy's proxyauth, driven by arbstr's config instead of the `proxyauth` option (which
    stays mitmproxy's own, for whoever sets it). The arbstr addon calls its hooks itself, first,
    so no one strips or reads a request's credentials before they are checked."""

    def load(self, loader) -> None:
        pass

    def configure(self, updated) -> None:
        pass

    def use(self, server: ServerConfig) -> None:
        tokens = [t.token.get_secret_value() for t in server.tokens]
        if server.auth_token is not None:
            tokens.append(server.auth_token.get_secret_value())
        self.validator = TokenValidator(tokens) if tokens else None

    def http_connect(self, f: http.HTTPFlow) -> None:
        if proxyauth.is_http_proxy(f):
            super().http_connect(f)

    def requestheaders(self, f: http.HTTPFlow) -> None:
        if proxyauth.is_http_proxy(f):
            super().requestheaders(f)

    def authenticate_http(self, f: http.HTTPFlow) -> bool:
        if super().authenticate_http(f):
            return True
        error = ProxyAuthRequired("This arbstr routes only for clients that send its auth token as proxy "
                                  "credentials: HTTPS_PROXY=http://arbstr:<token>@host:port (any user name).")
        f.response = http.Response.make(error.status, error.to_json(), {
            "content-type": "application/json", "proxy-authenticate": f'Basic realm="{REALM}"'})
        return False
