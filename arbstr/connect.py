"""Opening a connection to a provider: TCP, through a SOCKS proxy or not, then TLS with the
provider's own trust settings.

Routstr nodes may be reached over HTTPS with a private CA (`ca_file`), or only as Tor `.onion`
services (`proxy = "socks5h://127.0.0.1:9050"`: the proxy resolves the name, as `.onion` needs).
The SOCKS handshake is python-socks'; TLS is asyncio's over the socket it returns. HttpClient
keeps the connections open and reuses them, so a TLS handshake (and a Tor circuit's setup) is
paid once per pooled connection, not per request.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from arbstr.httpclient import Origin, split_url

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store (SSL_CERT_FILE and SSL_CERT_DIR are honoured), made once."""
    return ssl.create_default_context()


def ssl_context_for(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """A provider's TLS context: its own CA bundle, or no verification at all (`verify = false`)."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return default_ssl_context()


def _proxy(url: str) -> Proxy:
    # socks5h is socks5 with the name resolved by the proxy (python-socks' rdns): what Tor needs.
    remote_dns = url.startswith("socks5h://")
    return Proxy.from_url("socks5://" + url.removeprefix("socks5h://") if remote_dns else url, rdns=remote_dns)


async def open_stream(origin: Origin, *, ssl_context: ssl.SSLContext | None = None,
                      proxy: str | None = None) -> Stream:
    """A connection to `origin` (TLS when https), through `proxy` when given. The caller bounds
    the time it takes. OSError (a proxy's refusal included) or ssl.SSLError when it cannot be opened."""
    tls = origin.scheme == "https"
    context = (ssl_context or default_ssl_context()) if tls else None
    hostname = origin.host if tls else None
    if proxy is None:
        return await asyncio.open_connection(origin.host, origin.port, ssl=context, server_hostname=hostname)
    try:
        sock = await _proxy(proxy).connect(origin.host, origin.port)
    except ProxyError as exc:  # the proxy answered, but would not connect: as good as unreachable
        raise ConnectionError(f"the proxy could not reach {origin.host}:{origin.port} ({exc})") from exc
    try:
        return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise


@dataclass(frozen=True, slots=True)
class Route:
    """How to reach one provider's origin."""

    ssl_context: ssl.SSLContext | None = None
    proxy: str | None = None


class Connector:
    """Opens each provider's connections its own way (TLS trust, proxy); other origins directly."""

    def __init__(self, routes: Iterable[tuple[str, Route]] = (), default: Route = Route()) -> None:
        """`routes`: (a provider's base URL, how to reach it)."""
        self.routes = {split_url(url)[0]: route for url, route in routes}
        self.default = default

    async def __call__(self, origin: Origin) -> Stream:
        route = self.routes.get(origin, self.default)
        return await open_stream(origin, ssl_context=route.ssl_context, proxy=route.proxy)


def connector_for(providers: Iterable, global_proxy: str | None) -> Connector:
    """Each configured provider's route (its `ca_file`, `verify`, `proxy`, else `[routing] proxy`)."""
    return Connector([(p.url, Route(ssl_context_for(p.ca_file, p.verify), p.proxy or global_proxy)) for p in providers],
                     Route(proxy=global_proxy))
