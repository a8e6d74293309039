"""What mitmweb and the mitmproxy console show of routed traffic, built from plain data.

A routed flow is rewritten to show the request as the provider received it (its URL, the headers
arbstr sent, the credential masked) and the provider's address as its server; each failed attempt
becomes a flow of its own; a streamed body keeps a bounded copy. Flows arbstr answers itself show
the address the client used, not the reverse-mode placeholder. Until a flow is rewritten it stays
out of the lists (`UntilShown`), so no address of arbstr's own ever shows. Nothing here decides anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from mitmproxy import connection, http
from mitmproxy.flow import Error

from arbstr.exchange import ANSWERED
from arbstr.httpclient import split_url
from arbstr.pricing import format_sats

ANSWERED_STATES = frozenset(state.value for state in ANSWERED)
FAILED_MARK = ":x:"
FAILOVER_MARK = ":arrows_counterclockwise:"
ERROR_MARK = ":warning:"
SHOWN = "arbstr_shown"
"""flow.metadata: the flow shows what really happened (see `UntilShown`)."""
DETAIL_CHARS = 160
"""How much of an attempt's (already redacted) failure detail a comment carries."""


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One try at one provider, as a flow shows it."""

    provider: str
    url: str
    state: str
    """How it ended, in a word or two (`refused`, `header_timeout`, `status`, ... or `ok`)."""
    status: int | None = None
    detail: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """The request headers sent, the credentials already masked (the exchange never hands them out)."""
    started: float | None = None
    ended: float | None = None

    @property
    def failed(self) -> bool:
        """Not the answer the client got (a 4xx the request caused is an answer, not a failure)."""
        return self.state not in ANSWERED_STATES

    @property
    def reason(self) -> str:
        """`503`, `refused`, `header_timeout`, `out_of_funds 402`: the shortest honest account of the failure."""
        if self.status and self.state.lower() == "status":
            return str(self.status)
        return self.state.lower() + (f" {self.status}" if self.status else "")

    def to_metadata(self) -> dict[str, object]:
        """The attempt in full for flow.metadata (plain values: flow files store it)."""
        return {"provider": self.provider, "url": self.url, "state": self.state, "status": self.status,
                "detail": self.detail}


@dataclass(frozen=True, slots=True)
class RouteSummary:
    """What a routed request came to, for its one-line comment."""

    model: str
    provider: str | None
    attempts: Sequence[AttemptView]
    estimated_sats: Decimal | None = None
    cost_sats: Decimal | None = None
    next_best_sats: Decimal | None = None
    error: str | None = None


def route_comment(route: RouteSummary) -> str:
    """`gpt-4o → dear 0.72 sats (saved 0.12) after cheapfail 503`: whole, short, secret-free."""
    failures = ", ".join(f"{a.provider} {a.reason}" for a in route.attempts if a.failed)
    if route.provider is None:
        return f"{route.model} ✗ no provider answered: {failures or route.error or 'none eligible'}"
    text = f"{route.model} → {route.provider}"
    if route.cost_sats is not None:
        text += f" {format_sats(route.cost_sats)} sats"
        if route.next_best_sats is not None and route.next_best_sats > route.cost_sats:
            text += f" (saved {format_sats(route.next_best_sats - route.cost_sats)})"
    elif route.estimated_sats is not None:
        text += f" ~{format_sats(route.estimated_sats)} sats estimated"
    if failures:
        text += f" after {failures}"
    if route.error:
        text += f"; {route.error}"
    return text


def attempt_comment(attempt: AttemptView, number: int, request_id: str, model: str) -> str:
    """What a failed attempt's own flow says: which client request it served, and why it failed."""
    detail = attempt.detail[:DETAIL_CHARS]
    return (f"{attempt.provider} {attempt.reason}: attempt {number} for request {request_id[:12]} ({model})"
            + (f": {detail}" if detail else ""))


class UntilShown:
    """A view filter around the user's: a live flow arbstr handles stays out of mitmweb's and
    mitmproxy's flow lists until it is marked `SHOWN`. mitmproxy lists a flow as soon as its
    request head is in, before any addon has seen it: a routed flow's address is the reverse-mode
    placeholder until a provider answered, and a stream's is arbstr's relay until its head passed
    through; listed then, those internal addresses would show in the live view. A flow the user
    intercepted is listed all the same: it waits for them to resume it."""

    __slots__ = ("inner", "handles")

    def __init__(self, inner: Callable[[object], bool], handles: Callable[[http.HTTPFlow], bool]) -> None:
        self.inner, self.handles = inner, handles

    def __call__(self, flow) -> bool:
        if (flow.live and not flow.intercepted and isinstance(flow, http.HTTPFlow) and SHOWN not in flow.metadata
                and self.handles(flow)):
            return False
        return self.inner(flow)


class RelayOutOfTheLog(logging.Filter):
    """mitmproxy logs each server connection it opens and closes; for a stream that is arbstr's
    own relay, whose address no flow shows either. Those two lines stay out of the event log."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.lines = frozenset({f"server connect {address}", f"server disconnect {address}"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.lines


def shown(flow: http.HTTPFlow) -> None:
    """The flow may be listed: it shows what really happened (or all that ever will)."""
    flow.metadata[SHOWN] = True


def show_sent(flow: http.HTTPFlow, url: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """The flow's request becomes the one the provider received: its URL, and the headers arbstr
    sent (credentials masked) framed as the HTTP/1.1 client frames them (host first, the body's
    length last); the body is the client's, which arbstr forwards untouched."""
    origin, target = split_url(url)
    data = flow.request.data
    data.scheme, data.host, data.port, data.path = origin.scheme.encode(), origin.host, origin.port, target.encode()
    flow.request.headers = http.Headers([(b"host", origin.netloc.encode()), *headers,
                                         (b"content-length", b"%d" % len(data.content or b""))])


def show_server(flow: http.HTTPFlow, url: str, started: float | None = None, ended: float | None = None) -> None:
    """The flow's server becomes the provider (a copy for showing: the connection mitmproxy used,
    if any, is left as it is)."""
    flow.server_conn = _server(url, started, ended)


def show_local(flow: http.HTTPFlow) -> None:
    """A flow arbstr answered itself shows the address the client used, not the reverse target."""
    sockname = flow.client_conn.sockname
    if not sockname or not sockname[0]:
        return
    data = flow.request.data
    data.scheme, data.host, data.port = b"http", sockname[0], sockname[1]
    flow.server_conn = connection.Server(address=None)


def attempt_flow(client: http.HTTPFlow, attempt: AttemptView, body: bytes, comment_text: str) -> http.HTTPFlow:
    """A failed attempt as a flow of its own: the request the provider was sent, and its error
    status or how the exchange broke off."""
    started = attempt.started or client.request.timestamp_start
    ended = attempt.ended or time.time()
    failed = http.HTTPFlow(client.client_conn, _server(attempt.url, started, ended))
    failed.request = http.Request.make("POST", attempt.url, body)
    failed.request.timestamp_start = failed.request.timestamp_end = started
    show_sent(failed, attempt.url, attempt.headers)
    if attempt.status:
        failed.response = http.Response.make(
            attempt.status, attempt.detail.encode(), {"content-type": "text/plain; charset=utf-8"})
        failed.response.timestamp_start = failed.response.timestamp_end = ended
    else:
        failed.error = Error(attempt.detail or attempt.reason, ended)
    failed.comment = comment_text
    failed.marked = FAILED_MARK
    failed.live = False
    failed.timestamp_created = started
    return failed


def _server(url: str, started: float | None, ended: float | None) -> connection.Server:
    origin, _ = split_url(url)
    server = connection.Server(address=(origin.host, origin.port))
    server.timestamp_start = server.timestamp_tcp_setup = started
    server.timestamp_end = ended
    if origin.scheme == "https":
        server.sni = origin.host
        server.timestamp_tls_setup = started
    return server


class BoundedCopy:
    """The first `limit` bytes of a stream, kept so its body can be read after it passed."""

    __slots__ = ("limit", "_parts", "_size", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self.limit - self._size
        if room <= 0:
            self.truncated = self.truncated or bool(chunk)
            return
        if len(chunk) > room:
            chunk, self.truncated = chunk[:room], True
        self._parts.append(chunk)
        self._size += len(chunk)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
