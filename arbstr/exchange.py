"""One attempt at one provider, from connect to settle, and the plan runner that makes the attempts.

Why arbstr sends requests itself: mitmproxy cannot re-send a flow (a refused connection ends it
with mitmproxy's own HTML 502), nor wait for response headers with a deadline. So the addon makes
the attempts and only hands mitmproxy an answer that is already worth returning: a whole body
(read here, within its deadline and size cap, so a stalled or cut body fails over before the
client sees a byte), or a stream (handed to `arbstr.relay`, which reads it chunk by chunk within
an idle deadline).

Every `Exchange` ends exactly once, in one `EndState`, and that end is reported once: to the
health book, to the payment that paid for it, and as an `Attempt` to the ledger, the response
headers and mitmweb. A request that may have reached a provider is never sent to it again.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from arbstr.budgets import RequestBudget
from arbstr.errors import ArbstrError, InsufficientFunds, UpstreamError, WalletError
from arbstr.health import HealthBook
from arbstr.httpclient import (BodyTooLarge, ConnectError, ConnectTimeout, HttpClient, HttpError, NoResponse,
                               Response)
from arbstr.redact import redact, redact_fields
from arbstr.router import RoutePlan


class EndState(StrEnum):
    """How one attempt at one provider ended."""

    OK = "ok"
    REFUSED = "refused"
    CONNECT_FAILED = "connect"
    """DNS, TLS, unreachable: no connection, nothing sent."""
    CONNECT_TIMEOUT = "connect_timeout"
    NO_RESPONSE = "no_response"
    """The connection closed after the request was written, before any answer: maybe billed, never re-sent."""
    PROTOCOL = "protocol"
    """An answer that is not HTTP."""
    HEADER_TIMEOUT = "header_timeout"
    STATUS = "status"
    """5xx, 429, 408 and other answers that say "not now" rather than "this request is wrong"."""
    OUT_OF_FUNDS = "out_of_funds"
    """402: the provider wants more money."""
    AUTH_FAILED = "auth_failed"
    """401/403: the provider refused arbstr's own key."""
    MODEL_UNKNOWN = "model_unknown"
    """400/404 saying the provider does not serve the model: its catalogue was wrong, not the request."""
    BODY_TIMEOUT = "body_timeout"
    BODY_CUT = "body_cut"
    BODY_TOO_LARGE = "body_too_large"
    STREAM_IDLE = "stream_idle"
    """A stream paused longer than stream_idle_timeout between chunks."""
    STREAM_BROKEN = "stream_broken"
    CLIENT_GONE = "client_gone"
    """The client left; the provider is not to blame."""
    CLIENT_ERROR = "client_error"
    """A 4xx the request itself caused, returned to the client as it is."""
    UNPAID = "unpaid"
    """Not sent: the wallet could not pay this provider (too little in it, or a mint it does not take)."""
    SKIPPED = "skipped"
    """Not tried: the provider's half-open breaker already has its one trial request in flight."""
    BUDGET = "budget"
    """Not sent: the provider's own budget is spent (arbstr.budgets)."""
    LOCAL = "local"
    """arbstr's own trouble (out of file descriptors): says nothing about the provider."""


NOT_SENT = frozenset({EndState.SKIPPED, EndState.BUDGET, EndState.UNPAID})
"""Attempts that never reached the provider: arbstr passed it over."""
CONNECTION_FAILURES = frozenset({EndState.REFUSED, EndState.CONNECT_FAILED, EndState.CONNECT_TIMEOUT,
                                 EndState.NO_RESPONSE, EndState.PROTOCOL})
"""Count against the whole provider (its node is down for every model)."""
ANSWER_FAILURES = frozenset({EndState.HEADER_TIMEOUT, EndState.STATUS, EndState.BODY_TIMEOUT, EndState.BODY_CUT,
                             EndState.BODY_TOO_LARGE, EndState.STREAM_IDLE, EndState.STREAM_BROKEN})
"""Count against the provider for this model."""
ANSWERED = frozenset({EndState.OK, EndState.CLIENT_ERROR})
"""The attempt's answer goes to the client."""

RETRYABLE_STATUS = frozenset({408, 429})
MODEL_UNKNOWN_CODES = frozenset({"invalid_model", "model_not_found", "model_not_available"})
FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent"})
"""The only client headers a provider sees: nothing that identifies or pays for the client."""
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te",
                        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"})
PRIVATE_RESPONSE_HEADERS = HOP_BY_HOP | {b"x-cashu"}
"""Never passed on to the client: framing, and `X-Cashu` change, which is money the payment keeps."""
IDENTITY = (b"accept-encoding", b"identity")
MASKED_CREDENTIAL = b"[provider credential]"
"""What a view of the flow shows for the credentials a provider was sent."""
"""Asked of every provider, so arbstr reads usage from bodies it can parse as they pass."""
ERROR_BODY_LIMIT = 64 * 1024
MAX_DETAIL = 200

@dataclass(frozen=True, slots=True)
class ProviderEndpoint:
    name: str
    base_url: str
    api_key: str

    def __repr__(self) -> str:  # never show the key
        return f"ProviderEndpoint({self.name!r}, {self.base_url!r})"


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds each phase of an attempt may take."""

    connect: float
    headers: float
    """From sending to the response head."""
    body: float
    """A whole non-streamed body (and a 4xx body passed to the client)."""
    stream_idle: float
    """The longest gap between a stream's chunks."""
    error_body: float = 5.0
    """The body of an error answer arbstr reads only for its message."""
    max_body_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one provider, as the ledger, the response headers and mitmweb read it."""

    provider: str
    state: EndState
    status: int | None = None
    detail: str = ""
    url: str = ""
    sent_headers: tuple[tuple[bytes, bytes], ...] = ()
    """What the provider was sent besides the body, as sent, its credentials masked (for mitmweb)."""
    paid_msats: int | None = None
    """What the payment shows the provider took for it (Exchange.paid_msats)."""

    @property
    def outcome(self) -> str:
        return self.state.value

    def describe(self) -> str:
        return f"{self.provider}: {self.detail or self.state.value}"


def summarize_attempts(attempts: Sequence[Attempt]) -> str:
    """Who failed and how, for a header and the ledger: `alpha=connect; beta=status 503`, or `none`."""
    failed = [a for a in attempts if a.state not in ANSWERED]
    return "; ".join(f"{a.provider}={a.state.value}{f' {a.status}' if a.status else ''}" for a in failed) or "none"


def report_health(health: HealthBook, attempt: Attempt, model: str) -> None:
    """Tell the health book what an ended attempt showed about its provider."""
    state, provider = attempt.state, attempt.provider
    if state is EndState.OK or state is EndState.CLIENT_ERROR:
        health.record_success(provider, model)
    elif state in CONNECTION_FAILURES:
        health.record_failure(provider, model, attempt.describe(), connection=True, open_now=state is EndState.REFUSED)
    elif state in ANSWER_FAILURES:
        health.record_failure(provider, model, attempt.describe())
    elif state is EndState.OUT_OF_FUNDS:
        health.record_out_of_funds(provider, attempt.detail)
    elif state is EndState.AUTH_FAILED:
        health.record_auth_failed(provider, attempt.detail)
    else:  # client gone, model unknown, local trouble: nothing against the provider
        health.release(provider, model)


def paid_by_failures(attempts: Sequence[Attempt]) -> int:
    """Msats the payments show providers took for attempts that did not answer (an X-Cashu token
    whose change came in the head of an answer that then broke off): money the request cost too."""
    return sum(a.paid_msats or 0 for a in attempts if a.state not in ANSWERED)


def failures_of(attempts: Sequence[Attempt]) -> tuple[tuple[str, str], ...]:
    """(provider, cause) of each attempt passed over: what the metrics count as failovers."""
    return tuple((a.provider, a.outcome) for a in attempts if a.state not in ANSWERED)


class AllProvidersFailed(UpstreamError):
    """Every candidate of the plan failed; the client reads each attempt."""

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        self.attempts = list(attempts)
        super().__init__(
            "No provider could serve the request: " + "; ".join(a.describe() for a in attempts) + ".",
            details={"attempts": [{"provider": a.provider, "outcome": a.outcome, "status": a.status,
                                   "detail": a.detail} for a in attempts]},
        )

    def explain(self, plan: RoutePlan) -> None:
        """Say why no other provider stepped in: fallback off, or dearer than max_price_ratio allows."""
        tried = {a.provider for a in self.attempts}
        not_tried = [(c.provider, "fallback is off (X-Arbstr-Fallback: none or the policy's allow_fallback)")
                     for c in plan.candidates if c.provider not in tried and not plan.allow_fallback]
        not_tried += [(e.provider, e.reason) for e in plan.held_back]
        if not_tried:
            self.message += " Not tried: " + "; ".join(f"{p}: {reason}" for p, reason in not_tried) + "."
            self.details["not_tried"] = [{"provider": p, "reason": reason} for p, reason in not_tried]


class CannotPay(InsufficientFunds):
    """No candidate could be paid from the wallet (402): `shortfall_sats` says by how much it fell short."""

    def __init__(self, message: str, attempts: Sequence[Attempt], shortfall_sats: int | None) -> None:
        details: dict = {"attempts": [a.describe() for a in attempts]}
        if shortfall_sats is not None:
            details["shortfall_sats"] = shortfall_sats
        super().__init__(message, details=details)
        self.attempts = list(attempts)


class ClientGone(ArbstrError):
    """The client left before an answer; no further attempt was started for it."""

    status = 499
    type = "client_error"
    code = "client_disconnected"

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        self.attempts = list(attempts)
        super().__init__("The client closed the connection before an answer.")


class Payment(Protocol):
    """How an attempt pays its provider."""

    async def headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """Credential headers, asked for just before the request is sent (a token paid here is
        written down before this returns)."""

    async def received(self, exchange: Exchange, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """The response head, before anything of it goes on to the client: change is kept here."""

    def finished(self, exchange: Exchange, state: EndState) -> None:
        """The attempt's end, once."""


class KeyPayment:
    """A key (or a Cashu token used as one) holding a balance at the provider: `Authorization: Bearer`."""

    def __init__(self, api_key: str) -> None:
        self._headers = [(b"authorization", b"Bearer " + api_key.encode())]

    async def headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        return self._headers

    async def received(self, exchange: Exchange, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        pass

    def finished(self, exchange: Exchange, state: EndState) -> None:
        pass


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """What is sent to each candidate: the path under its base URL, the body, the client's
    forwardable headers (raw bytes, checked), and the facts the exchange needs."""

    path: str
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    model: str
    stream: bool
    request_id: str = ""
    """arbstr's id of the request: a token paid for it is written down under it."""


class Exchange:
    """One attempt at one provider: connect, send, head, then a whole body or a stream; one end state."""

    def __init__(self, client: HttpClient, endpoint: ProviderEndpoint, request: OutboundRequest,
                 deadlines: Deadlines, health: HealthBook, payment: Payment,
                 on_model_unknown: Callable[[str, str], None] | None = None) -> None:
        self.client, self.endpoint, self.request = client, endpoint, request
        self.deadlines, self.health, self.payment = deadlines, health, payment
        self._on_model_unknown = on_model_unknown
        self.provider = endpoint.name
        self.url = endpoint.base_url + request.path
        self.status: int | None = None
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        """The provider's response headers that may go on to the client."""
        self.attempt: Attempt | None = None
        """Set when the exchange ends, once."""
        self.sent_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.client_gone = False
        self.unpaid: WalletError | None = None
        """Why the wallet could not pay this attempt, when it could not."""
        self.paid_msats: int | None = None
        """What the payment shows the provider took for this attempt (X-Cashu: the token minus the
        change in the response head); None when only the provider's own report can say."""
        self._response: Response | None = None
        self._by_name: dict[bytes, bytes] | None = None

    def header(self, name: str) -> str | None:
        """The first value of a response header. The headers are indexed by lower-cased name on the
        first call: an answer is asked for three or four of them."""
        if self._by_name is None:
            by_name: dict[bytes, bytes] = {}
            for key, value in self.headers:
                by_name.setdefault(key.lower(), value)
            self._by_name = by_name
        value = self._by_name.get(name.lower().encode())
        return None if value is None else value.decode("latin-1")

    @property
    def ended(self) -> bool:
        return self.attempt is not None

    async def open(self, final: bool = False) -> bool:
        """Send the request and wait for the answer's head. True when the answer goes to the client
        (2xx, or a 4xx the request caused); False when the attempt has ended and the next candidate
        should be tried. `final` (fallback is off): an error status is the answer too, body and all,
        though the attempt still ends as the failure it is."""
        try:
            credentials = await self.payment.headers(self)
        except WalletError as exc:
            # The request was not sent: the next candidate is tried (the dispatcher answers 402 when
            # none could be paid). A node that did not answer while its key was being funded is down.
            if exc.code == "node_unreachable":
                self.end(EndState.CONNECT_FAILED, redact(exc.message))
            else:
                self.unpaid = exc
                self.end(EndState.UNPAID, redact(exc.message))
            return False
        headers = [*self.request.headers, *credentials, IDENTITY]
        # As sent, bytes: only a view of the flow (mitmweb) reads them, and it wants bytes too.
        self.sent_headers = (*self.request.headers, *[(k, MASKED_CREDENTIAL) for k, _ in credentials], IDENTITY)
        try:
            async with asyncio.timeout(self.deadlines.headers):  # what wait_for does, without its own frame
                response = await self.client.request("POST", self.url, headers, self.request.body)
        except (TimeoutError, HttpError, OSError) as exc:
            self.end(*_failure(exc, self.deadlines.headers))
            return False
        self._response = response
        self.status, self.reason = response.status, response.reason
        await self.payment.received(self, response.status, response.headers)
        # A provider may quote its key in any header: none reaches the client unredacted.
        self.headers = redact_fields((k, v) for k, v in response.headers if k.lower() not in PRIVATE_RESPONSE_HEADERS)
        self._by_name = None
        status = response.status
        if 200 <= status < 300:
            return True
        if final and (status < 400 or status >= 500 or status in RETRYABLE_STATUS or status in (401, 402, 403)):
            return await self._end_as_answer(EndState.OUT_OF_FUNDS if status == 402 else EndState.AUTH_FAILED
                                             if status in (401, 403) else EndState.STATUS)
        if status < 400 or status >= 500 or status in RETRYABLE_STATUS:
            await self._end_with_error_body(EndState.STATUS)
            return False
        if status == 402:
            await self._end_with_error_body(EndState.OUT_OF_FUNDS)
            return False
        if status in (401, 403):
            await self._end_with_error_body(EndState.AUTH_FAILED)
            return False
        if status in (400, 404):
            body = await self.read_body(end=False)
            if body is None:
                return False
            code, message = _error_fields(body)
            if code in MODEL_UNKNOWN_CODES:
                if self._on_model_unknown is not None:
                    self._on_model_unknown(self.provider, self.request.model)
                self.end(EndState.MODEL_UNKNOWN, self._detail(code, message))
                return False
        return True

    async def _end_with_error_body(self, state: EndState) -> None:
        """Read an error answer's body (briefly: its message is all arbstr wants) and end."""
        try:
            async with asyncio.timeout(min(self.deadlines.error_body, self.deadlines.body)):
                raw = await self._response.read(ERROR_BODY_LIMIT)
        except (TimeoutError, HttpError, OSError):
            raw = b""
        finally:
            await self._response.aclose()
        self.end(state, self._detail(*_error_fields(raw)))

    async def _end_as_answer(self, state: EndState) -> bool:
        """Keep an error answer's body for the client, and end as the failure it is."""
        body = await self.read_body(end=False)
        if body is not None:
            self.end(state, self._detail(*_error_fields(body)))
        return body is not None

    def _detail(self, code: str | None, message: str | None) -> str:
        text = f"HTTP {self.status}"
        if code and code != str(self.status):  # Routstr repeats the status as its code: say it once
            text += f" {code}"
        if message:
            text += f": {message[:MAX_DETAIL]}"
        return redact(text, [self.endpoint.api_key])

    body: bytes | None = None
    """The whole body, once `read_body` has read it."""

    async def read_body(self, limit: int | None = None, *, end: bool = True) -> bytes | None:
        """The whole body within the body deadline and size cap; None when that failed (the
        attempt has then ended). `end`: the body completes the attempt (it ends OK or CLIENT_ERROR)."""
        if self.body is not None:
            if end and not self.ended:
                self._end_answered()
            return self.body
        limit = limit or self.deadlines.max_body_bytes
        # Most answers arrive with their head: then the body is taken at once, no deadline to set.
        self.body = self._response.buffered(limit)
        if self.body is None:
            try:
                async with asyncio.timeout(self.deadlines.body):
                    self.body = await self._response.read(limit)
            except TimeoutError:
                self.end(EndState.BODY_TIMEOUT, f"the body did not arrive within {self.deadlines.body:g} s")
                return None
            except BodyTooLarge:
                self.end(EndState.BODY_TOO_LARGE, f"a body over {limit} bytes")
                return None
            except (HttpError, OSError) as exc:
                self.end(EndState.BODY_CUT, f"the body was cut short ({_reason(exc)})")
                return None
            finally:
                await self._response.aclose()
        if end:
            self._end_answered()
        return self.body

    def _end_answered(self) -> None:
        self.end(EndState.OK if 200 <= (self.status or 0) < 300 else EndState.CLIENT_ERROR)

    async def chunks(self, drain_when_client_gone: bool,
                     complete: Callable[[], bool] = lambda: True) -> AsyncIterator[bytes]:
        """The streamed body as it arrives, each gap within stream_idle. Ends the exchange: OK,
        STREAM_IDLE, STREAM_BROKEN (also when the body ended cleanly but `complete()` says the
        answer did not), or CLIENT_GONE (set `client_gone`; with `drain_when_client_gone` the rest
        is still read, so the usage the provider bills is seen)."""
        response, idle = self._response, self.deadlines.stream_idle
        loop = asyncio.get_running_loop()
        state, detail = EndState.OK, ""
        try:
            async with asyncio.timeout(idle) as deadline:
                async for data in response.iter_raw():
                    deadline.reschedule(loop.time() + idle)
                    yield data
                    if self.client_gone and not drain_when_client_gone:
                        break
        except TimeoutError:
            state, detail = EndState.STREAM_IDLE, f"no chunk for {idle:g} s"
        except (HttpError, OSError) as exc:
            state, detail = EndState.STREAM_BROKEN, f"the provider broke off the stream ({_reason(exc)})"
        finally:
            await response.aclose()
            if self.client_gone and state is EndState.OK:
                state = EndState.CLIENT_GONE
            elif state is EndState.OK and not complete():
                state, detail = EndState.STREAM_BROKEN, "the stream ended without [DONE]"
            if not self.ended:
                self.end(state, detail)

    async def close(self, state: EndState = EndState.CLIENT_GONE) -> None:
        """Give up on an opened answer that will not be read (never claimed, or arbstr is stopping)."""
        if self._response is not None:
            await self._response.aclose()
        if not self.ended:
            self.end(state)

    def end(self, state: EndState, detail: str = "") -> Attempt:
        """Report how the attempt ended, once: health, payment, and the attempt record."""
        if self.attempt is not None:
            return self.attempt
        self.attempt = Attempt(self.provider, state, self.status, detail, self.url, self.sent_headers, self.paid_msats)
        report_health(self.health, self.attempt, self.request.model)
        self.payment.finished(self, state)
        return self.attempt


def _cannot_pay(unpaid: Sequence[WalletError], attempts: Sequence[Attempt]) -> CannotPay:
    """The 402 for a request no candidate could be paid for: the smallest shortfall when the wallet
    was too small, else why the wallet could pay none of them."""
    short = [e for e in unpaid if isinstance(e, InsufficientFunds)]
    if short:
        best = min(short, key=lambda e: e.details.get("shortfall_sats", 0))
        return CannotPay(best.message, attempts, best.details.get("shortfall_sats"))
    return CannotPay(f"the wallet cannot pay any provider of this model: {unpaid[0].message}", attempts, None)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _error_fields(raw: bytes) -> tuple[str | None, str | None]:
    """(code or type, message) from an OpenAI- or Routstr-shaped error body, whatever it holds."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    error = parsed.get("error")
    if not isinstance(error, dict):
        error = parsed.get("detail") if isinstance(parsed.get("detail"), dict) else {}
    code = error.get("type") if error.get("type") in MODEL_UNKNOWN_CODES else error.get("code") or error.get("type")
    message = error.get("message") or error.get("reason")
    if isinstance(error.get("amount_required_msat"), int):  # an X-Cashu token too small: what the node reserves
        message = f"{message or ''} (amount_required_msat {error['amount_required_msat']})"
    return (str(code) if code is not None else None), (str(message) if message is not None else None)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _failure(exc: BaseException, header_timeout: float) -> tuple[EndState, str]:
    """The end state of an attempt that got no answer, as precisely as the exception chain allows."""
    if isinstance(exc, ConnectTimeout):
        return EndState.CONNECT_TIMEOUT, "timed out connecting"
    if isinstance(exc, TimeoutError):
        return EndState.HEADER_TIMEOUT, f"no response headers within {header_timeout:g} s"
    if isinstance(exc, ConnectError):
        causes = _causes(exc)
        if any(isinstance(c, OSError) and c.errno in (errno.EMFILE, errno.ENFILE) for c in causes):
            return EndState.LOCAL, "arbstr has run out of file descriptors (raise ulimit -n)"
        if any(isinstance(c, ConnectionRefusedError) for c in causes):
            return EndState.REFUSED, "connection refused"
        return EndState.CONNECT_FAILED, f"cannot connect ({_reason(exc)})"
    if isinstance(exc, NoResponse):
        return EndState.NO_RESPONSE, "the connection closed after the request was sent, before any answer"
    return EndState.PROTOCOL, f"broken response ({_reason(exc)})"


@dataclass(slots=True)
class Answer:
    """The attempt whose answer goes to the client, and every attempt made to get it."""

    exchange: Exchange
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        return self.exchange.body is None


class Dispatcher:
    """Tries the candidates of a plan in order until one answers with something worth returning."""

    def __init__(self, endpoints: Mapping[str, ProviderEndpoint], deadlines: Deadlines, health: HealthBook,
                 client: HttpClient | None = None, payments: Mapping[str, Payment] | None = None,
                 on_model_unknown: Callable[[str, str], None] | None = None) -> None:
        self.endpoints = endpoints
        self.deadlines = deadlines
        self.health = health
        # No read deadline on the client: each phase has its own, set by the exchange.
        self._client = client or HttpClient(deadlines.connect)
        self.payments = {name: (payments or {}).get(name) or KeyPayment(e.api_key) for name, e in endpoints.items()}
        self.on_model_unknown = on_model_unknown

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, plan: RoutePlan, request: OutboundRequest,
                   client_gone: Callable[[], bool] = lambda: False,
                   on_attempt: Callable[[str], None] = lambda provider: None,
                   budget: RequestBudget | None = None) -> Answer:
        """The first useful answer, with every attempt made to get it. AllProvidersFailed when none
        came; ClientGone when the client left first (no attempt starts for a client that is gone).
        `on_attempt(provider)` is told just before each request is sent.

        `budget` reserves each candidate's worst case before it is sent (BudgetExceeded ends the
        request; a provider over its own cap is passed over) and is released when the attempt fails."""
        attempts: list[Attempt] = []
        unpaid: list[WalletError] = []
        # Without fallback the first candidate is the only one: its answer, error status and all, is the answer.
        final = not plan.allow_fallback
        candidates = plan.candidates[:1] if final else plan.candidates
        for index, candidate in enumerate(candidates):
            if client_gone():
                raise ClientGone(attempts)
            provider = candidate.provider
            # The last candidate, when every one before was passed over without being sent anything,
            # goes even if its half-open breaker's trial is taken: better than failing untried.
            last_chance = index == len(candidates) - 1 and all(a.state in NOT_SENT for a in attempts)
            # budgets: reserve before sending; a provider whose own cap is reached is passed over
            if budget is not None and (capped := await budget.admit(candidate)):
                attempts.append(Attempt(provider, EndState.BUDGET, detail=capped))
                continue
            if not self.health.claim(provider, plan.model) and not last_chance:
                if budget is not None:
                    budget.release()
                attempts.append(Attempt(provider, EndState.SKIPPED, detail="its one trial request is in flight"))
                continue
            exchange = Exchange(self._client, self.endpoints[provider], request, self.deadlines, self.health,
                                self.payments[provider], self.on_model_unknown)
            on_attempt(provider)
            try:
                if await exchange.open(final):
                    whole = (not request.stream or not 200 <= exchange.status < 300
                             or "text/event-stream" not in (exchange.header("content-type") or "").lower())
                    if not whole or await exchange.read_body() is not None:
                        return Answer(exchange, attempts)
            except BaseException:
                # arbstr's own bug or cancellation: the attempt still ends once, blaming no one.
                await exchange.close(EndState.LOCAL)
                raise
            if budget is not None:
                budget.release()  # budgets: a failed attempt holds nothing
            attempts.append(exchange.attempt)
            if exchange.unpaid is not None:
                unpaid.append(exchange.unpaid)
        tried = [a for a in attempts if a.state is not EndState.SKIPPED]
        if unpaid and all(a.state is EndState.UNPAID for a in tried):
            raise _cannot_pay(unpaid, attempts)
        raise AllProvidersFailed(attempts)

    async def probe(self, endpoint: ProviderEndpoint) -> Attempt:
        """A light health check: the provider's model list, within the connect and header deadlines.
        It can close a connection breaker; it says nothing about money (an unfunded node answers 200)."""
        try:
            # No credentials: a Routstr node lists its models to anyone, and a probe pays nothing.
            async with asyncio.timeout(self.deadlines.connect + self.deadlines.headers):
                response = await self._client.request("GET", endpoint.base_url + "/models",
                                                      [IDENTITY])
                await response.read(self.deadlines.max_body_bytes)
        except (TimeoutError, HttpError, OSError) as exc:
            state, detail = _failure(exc, self.deadlines.headers)
            attempt = Attempt(endpoint.name, state, None, detail)
            if state is not EndState.LOCAL:
                self.health.record_failure(endpoint.name, None, attempt.describe(), connection=True,
                                           open_now=state is EndState.REFUSED)
            return attempt
        ok = response.status < 500 and response.status not in RETRYABLE_STATUS
        attempt = Attempt(endpoint.name, EndState.OK if ok else EndState.STATUS, response.status,
                          "" if ok else f"HTTP {response.status} from /models")
        if ok:
            self.health.record_probe_success(endpoint.name)
        else:
            self.health.record_failure(endpoint.name, None, attempt.describe())
        return attempt

