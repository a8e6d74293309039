"""Carrying out a route plan: arbstr itself sends the request to each candidate in turn.

Why not let mitmproxy forward the flow? mitmproxy cannot re-send a flow: a refused connection
ends it with mitmproxy's own HTML 502. So the addon makes the attempts (connect, send, wait for
the response headers within a deadline) and only hands mitmproxy a provider that has already
answered. A whole body is handed over as the flow's response; a stream is handed over through
`StreamRelay`, a loopback endpoint in the same process that mitmproxy then streams from, so the
client still gets every chunk the moment it arrives.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from arbstr.errors import UpstreamError
from arbstr.health import HealthBook
from arbstr.httpclient import ConnectError, ConnectTimeout, HttpClient, HttpError, Response
from arbstr.router import RoutePlan

RETRYABLE_STATUS = frozenset({402, 408, 429})
"""Statuses that say "not this provider, not now" rather than "this request is wrong"."""

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent")
"""The only client headers a provider sees: nothing that identifies or pays for the client."""

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te",
                        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"})


@dataclass(frozen=True, slots=True)
class ProviderEndpoint:
    name: str
    base_url: str
    api_key: str

    def __repr__(self) -> str:  # never show the key
        return f"ProviderEndpoint({self.name!r}, {self.base_url!r})"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one provider, as the client and the ledger read it."""

    provider: str
    outcome: str
    """`ok`, `status` (an error status), `refused`, `connect` (DNS, TLS, unreachable),
    `connect_timeout`, `header_timeout`, `protocol` (a broken answer) or `local` (arbstr's own
    trouble, such as running out of file descriptors)."""
    status: int | None = None
    detail: str = ""

    def describe(self) -> str:
        return f"{self.provider}: {self.detail}" if self.detail else f"{self.provider}: {self.outcome}"


def summarize_attempts(attempts: Sequence[Attempt]) -> str:
    """Who failed and how, for a header and the ledger: `alpha=connect; beta=status 503`, or `none`."""
    failed = [a for a in attempts if a.outcome != "ok"]
    return "; ".join(f"{a.provider}={a.outcome}{f' {a.status}' if a.status else ''}" for a in failed) or "none"


def failures_of(attempts: Sequence[Attempt]) -> tuple[tuple[str, str], ...]:
    """(provider, cause) of each attempt passed over: what the metrics count as failovers."""
    return tuple((a.provider, a.outcome) for a in attempts if a.outcome != "ok")


class AllProvidersFailed(UpstreamError):
    """Every candidate of the plan failed; the client reads each attempt."""

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        self.attempts = list(attempts)
        super().__init__(
            "No provider could serve the request: " + "; ".join(a.describe() for a in attempts) + ".",
            details={"attempts": [{"provider": a.provider, "outcome": a.outcome, "status": a.status,
                                   "detail": a.detail} for a in attempts]},
        )


class ProviderResponse:
    """A provider's answer whose headers have arrived; its body is read or streamed once."""

    def __init__(self, provider: str, response: Response) -> None:
        self.provider = provider
        self.status = response.status
        self.reason = response.reason
        self.headers: list[tuple[bytes, bytes]] = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]
        self._response = response

    def header(self, name: str) -> str | None:
        return self._response.header(name)

    async def read(self) -> bytes:
        """The body exactly as the provider sent it (still encoded if it was)."""
        try:
            return await self._response.read()
        finally:
            await self._response.aclose()

    async def iter_raw(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.iter_raw():
            yield chunk

    async def close(self) -> None:
        await self._response.aclose()


class Dispatcher:
    """Tries the candidates of a plan in order until one answers with something worth returning."""

    def __init__(self, endpoints: Mapping[str, ProviderEndpoint], connect_timeout: float,
                 header_timeout: float, health: HealthBook, client: HttpClient | None = None) -> None:
        self.endpoints = endpoints
        self.header_timeout = header_timeout
        self.connect_timeout = connect_timeout
        self.health = health
        # No read deadline: a stream may pause for long between tokens. The wait for headers
        # has its own deadline in _try.
        self._client = client or HttpClient(connect_timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, plan: RoutePlan, path: str, body: bytes,
                   client_headers: Sequence[tuple[str, str]]) -> tuple[ProviderResponse, list[Attempt]]:
        """The first useful answer, and every attempt made to get it; UpstreamError when none came."""
        forwarded = [(k, v) for k, v in client_headers if k.lower() in FORWARDED_REQUEST_HEADERS]
        attempts: list[Attempt] = []
        for candidate in plan.candidates:
            endpoint = self.endpoints[candidate.provider]
            response, attempt = await self._try(endpoint, path, body, forwarded)
            attempts.append(attempt)
            self.report(attempt, plan.model)
            if response is not None:
                return response, attempts
        raise AllProvidersFailed(attempts)

    async def _try(self, endpoint: ProviderEndpoint, path: str, body: bytes,
                   forwarded: list[tuple[str, str]]) -> tuple[ProviderResponse | None, Attempt]:
        headers = [*forwarded, ("authorization", f"Bearer {endpoint.api_key}"), ("accept-encoding", "identity")]
        try:
            response = await asyncio.wait_for(
                self._client.request("POST", endpoint.base_url + path, headers, body), self.header_timeout)
        except (TimeoutError, HttpError) as exc:
            return None, _failed_attempt(endpoint.name, exc, self.header_timeout)
        answer = ProviderResponse(endpoint.name, response)
        if answer.status in RETRYABLE_STATUS or answer.status >= 500:
            detail = await _error_summary(answer)
            return None, Attempt(endpoint.name, "status", answer.status, detail)
        return answer, Attempt(endpoint.name, "ok", answer.status)

    def report(self, attempt: Attempt, model: str | None) -> None:
        """Tell the health book what an attempt showed about its provider."""
        if attempt.outcome == "local":
            return  # arbstr's own trouble says nothing about the provider
        if attempt.outcome == "ok":
            self.health.record_success(attempt.provider, model)
        elif attempt.status == 402:
            self.health.record_out_of_funds(attempt.provider, attempt.detail)
        elif attempt.outcome in ("refused", "connect", "connect_timeout", "protocol"):
            self.health.record_failure(attempt.provider, model, attempt.describe(), connection=True,
                                       open_now=attempt.outcome == "refused")
        else:
            self.health.record_failure(attempt.provider, model, attempt.describe())

    async def probe(self, endpoint: ProviderEndpoint) -> Attempt:
        """A light health check: the provider's model list, within the connect and header deadlines."""
        headers = [("authorization", f"Bearer {endpoint.api_key}"), ("accept-encoding", "identity")]
        try:
            async with asyncio.timeout(self.connect_timeout + self.header_timeout):
                response = await self._client.request("GET", endpoint.base_url + "/models", headers)
                await response.read()
        except (TimeoutError, HttpError) as exc:
            attempt = _failed_attempt(endpoint.name, exc, self.header_timeout)
        else:
            ok = response.status < 500 and response.status not in (408, 429)
            attempt = Attempt(endpoint.name, "ok" if ok else "status", response.status,
                              "" if ok else f"HTTP {response.status} from /models")
        self.report(attempt, None)
        return attempt


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _failed_attempt(provider: str, exc: BaseException, header_timeout: float) -> Attempt:
    """Name the way a request failed before any answer, as precisely as the exception chain allows."""
    if isinstance(exc, ConnectTimeout):
        return Attempt(provider, "connect_timeout", None, "timed out connecting")
    if isinstance(exc, TimeoutError):
        return Attempt(provider, "header_timeout", None, f"no response headers within {header_timeout:g} s")
    if isinstance(exc, ConnectError):
        causes = _causes(exc)
        if any(isinstance(c, OSError) and c.errno in (errno.EMFILE, errno.ENFILE) for c in causes):
            return Attempt(provider, "local", None, "arbstr has run out of file descriptors (raise ulimit -n)")
        if any(isinstance(c, ConnectionRefusedError) for c in causes):
            return Attempt(provider, "refused", None, "connection refused")
        return Attempt(provider, "connect", None, f"cannot connect ({_reason(exc)})")
    return Attempt(provider, "protocol", None, f"broken response ({_reason(exc)})")


async def _error_summary(answer: ProviderResponse) -> str:
    """`HTTP 402 insufficient_balance: ...` from a provider's error body, read and closed."""
    try:
        raw = await answer.read()
        error = json.loads(raw).get("error", {})
        code, message = error.get("code"), error.get("message")
    except Exception:
        code = message = None
    text = f"HTTP {answer.status}"
    if code:
        text += f" {code}"
    if message:
        text += f": {str(message)[:200]}"
    return text


class StreamTap:
    """Sees a relayed stream's bytes as they pass, and how it ended. The default sees nothing."""

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self, error: str | None) -> None:
        pass


@dataclass(slots=True)
class _Pending:
    response: ProviderResponse
    tap: StreamTap
    expiry: asyncio.TimerHandle
    extra_headers: list[tuple[bytes, bytes]]


class StreamRelay:
    """A loopback HTTP/1.1 endpoint that serves streams the dispatcher has already opened.

    mitmproxy is pointed at it with a one-time ticket header; the relay answers with the
    provider's status and headers and then each chunk as it arrives (chunked encoding).
    """

    TICKET_HEADER = "x-arbstr-relay-ticket"
    UNCLAIMED_TIMEOUT = 30.0

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (their handlers then end on their own) and unclaimed stream."""
        if self._server:
            self._server.close()
        for writer in list(self._connections.values()):
            writer.transport.abort()
        for ticket in list(self._pending):
            await self._drop(ticket)
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)

    def register(self, response: ProviderResponse, tap: StreamTap | None = None,
                 extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> str:
        """A ticket for mitmproxy to claim the stream with; unclaimed streams are closed.
        `extra_headers` are sent after the provider's own."""
        ticket = secrets.token_urlsafe(24)
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self.UNCLAIMED_TIMEOUT, lambda: loop.create_task(self._drop(ticket)))
        self._pending[ticket] = _Pending(response, tap or StreamTap(), expiry, list(extra_headers))
        return ticket

    async def _drop(self, ticket: str) -> None:
        pending = self._pending.pop(ticket, None)
        if pending:
            pending.expiry.cancel()
            pending.tap.finish("the stream was never claimed by the proxy")
            await pending.response.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = writer
        try:
            while True:
                ticket = await _read_relay_request(reader, self.TICKET_HEADER)
                if ticket is None:
                    return
                pending = self._pending.pop(ticket, None)
                if pending is None:
                    body = UpstreamError("The provider's stream was no longer waiting for this request; "
                                         "send it again.", code="stream_expired").to_json()
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%b" % (len(body), body))
                    await writer.drain()
                    continue
                pending.expiry.cancel()
                if not await _relay(pending, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._connections.pop(task, None)
            writer.close()


async def _read_relay_request(reader: asyncio.StreamReader, ticket_header: str) -> str | None:
    """Read one request from mitmproxy (head and body); its ticket, or None at end of connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    ticket, length, chunked = None, 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == ticket_header.encode():
            ticket = value.decode()
        elif name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    elif length:
        await reader.readexactly(length)
    return ticket or ""


async def _relay(pending: _Pending, writer: asyncio.StreamWriter) -> bool:
    """Stream one response; True when it ended cleanly and the connection can serve another."""
    response, tap = pending.response, pending.tap
    head = [f"HTTP/1.1 {response.status} {response.reason}".encode()]
    head += [k + b": " + v for k, v in response.headers + pending.extra_headers]
    head.append(b"transfer-encoding: chunked")
    writer.write(b"\r\n".join(head) + b"\r\n\r\n")
    error = None
    try:
        async for chunk in response.iter_raw():
            if not chunk:
                continue
            tap.feed(chunk)
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, asyncio.CancelledError) as exc:
        error = "the client went away before the stream ended"
        if isinstance(exc, asyncio.CancelledError):
            raise
    except HttpError as exc:
        error = f"the provider broke off the stream ({_reason(exc)})"
    finally:
        tap.finish(error)
        await response.close()
    return error is None

