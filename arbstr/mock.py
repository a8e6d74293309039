"""A fake Routstr provider node (routstr-core v0.4.5) that really answers over HTTP on loopback.

It backs `arbstr serve --mock`, the test suite (with fault injection) and the benchmarks, so it
speaks the wire format of the captures in ROUTSTR.md exactly: same keys, same header names and
order (including the repeated `date`/`server` headers), Routstr-shaped errors, costs in msats.

The HTTP/1.1 server is a small asyncio one (keep-alive, Content-Length or chunked request bodies,
chunked streaming responses) running its own event loop in a daemon thread, so it works from
synchronous tests and next to another event loop such as mitmproxy's in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import logging
import math
import re
import secrets
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from arbstr import http1

ROUTSTR_VERSION = "0.4.5"
INITIAL_BALANCE_MSATS = 100_000_000
USD_PER_SAT = 0.001  # BTC pinned at $100k, as in the captures
MSATS_PER_USD = Decimal(1_000_000)
PROVIDER_ID = "mock"  # Routstr's `provider` / `upstream_provider_id`
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024

_log = logging.getLogger(__name__)

# What uvicorn answers to bytes that are not HTTP.
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: 30\r\n\r\nInvalid HTTP request received.")
_INVALID_KEY_FORMAT = "Invalid API key format. Expected an 'sk-...' API key or a 'cashu...' token."


@dataclass(frozen=True)
class MockModel:
    """A model a mock provider serves, priced in Routstr's units (sats per token, sats per request).

    `max_completion_tokens` is the model's output limit (`top_provider.max_completion_tokens`);
    it defaults to a quarter of the context window.
    """

    id: str
    prompt_sats_per_token: float
    completion_sats_per_token: float
    request_sats: float = 0.0
    context_length: int = 8192
    enabled: bool = True
    max_completion_tokens: int | None = None
    bills_request_fee: bool = False
    """Whether answers are billed the advertised `request` fee. routstr-core v0.4.5 advertises it
    (and counts it in `max_cost`) but does not bill it; a node that does is a different node."""

    @property
    def completion_token_limit(self) -> int:
        return self.max_completion_tokens or self.context_length // 4


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the mock provider received it, for tests to inspect."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> object:
        return json.loads(self.body)


def _default_models() -> list[MockModel]:
    """The models a provider serves when none are given: priced like the captured node's."""
    return [MockModel("gpt-4o-mini", 0.00015, 0.0006, context_length=128000, max_completion_tokens=16384),
            MockModel("llama3:8b", 0.00303, 0.00303, context_length=4096, max_completion_tokens=2048)]


class _BadRequest(Exception):
    """The bytes received are not an HTTP/1.x request this server can answer."""


class _ApiError(Exception):
    """A Routstr error answer.

    Routstr raises most errors as FastAPI HTTPExceptions (compact JSON, the error object both
    under `detail` and at the top); a few, like an unknown model, it writes itself with
    `json.dumps` and no `detail`.
    """

    def __init__(self, status: int, message: str, error_type: str, code: str | int, *,
                 with_detail: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": error_type, "code": code}
        self.with_detail = with_detail

    def body(self, request_id: str) -> bytes:
        if self.with_detail:
            return _compact({"detail": {"error": self.error}, "error": self.error, "request_id": request_id})
        return json.dumps({"error": self.error, "request_id": request_id}).encode()


def _invalid_model(model_id: object) -> _ApiError:
    return _ApiError(400, f"Model '{model_id}' not found", "invalid_model", 400, with_detail=False)


def _invalid_request(message: str) -> _ApiError:
    return _ApiError(400, message, "invalid_request_error", 400, with_detail=False)


def _injected_error(status: int, model_id: object) -> _ApiError:
    """The error body a real node sends with `status`, for `MockProvider.fail_status`."""
    if status == 400:
        return _invalid_model(model_id)
    if status == 401:
        return _ApiError(401, _INVALID_KEY_FORMAT, "invalid_request_error", "invalid_api_key")
    if status == 402:
        return _ApiError(402, "Insufficient balance: mock provider refuses to serve this request.",
                         "insufficient_quota", "insufficient_balance")
    if status == 429:
        return _ApiError(429, "Rate limit exceeded", "rate_limit_error", "rate_limit_exceeded")
    if status in (500, 502):
        return _ApiError(status, "Upstream request failed", "upstream_error", "upstream_error")
    if status == 503:
        return _ApiError(503, "Cashu mint unreachable", "cashu_error", "cashu_mint_unreachable")
    return _ApiError(status, f"Mock failure ({status})", "mock_failure", "mock_failure")


def _compact(payload: object) -> bytes:
    """JSON as FastAPI's JSONResponse writes it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _sats_text(msats: int) -> str:
    """Msats as Routstr writes sats in messages: 6143 -> '6.143', 1000 -> '1'."""
    return format(Decimal(msats) / 1000, "f")


def _msats(tokens: int, sats_per_token: float, factor: Decimal = Decimal(1)) -> int:
    """Cost of `tokens` in msats (× `factor`), rounded up; exact decimal arithmetic on the price as written."""
    return math.ceil(tokens * Decimal(str(sats_per_token)) * 1000 * factor)


def _request_fee_msats(model: MockModel) -> int:
    """The advertised per-request fee in msats, rounded half up (what a node that bills it charges)."""
    return int((Decimal(str(model.request_sats)) * 1000).to_integral_value(ROUND_HALF_UP))


def _count_words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def count_prompt_tokens(messages: list[dict]) -> int:
    """The mock's deterministic tokenizer: 4 per message plus one per whitespace-separated word.

    Words are counted in string contents and in the `text` parts of list contents; other parts
    (images, audio) count nothing.
    """
    tokens = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            tokens += sum(_count_words(part.get("text")) for part in content
                          if isinstance(part, dict) and part.get("type") == "text")
        else:
            tokens += _count_words(content)
        tokens += 4
    return tokens


def _model_entry(model: MockModel) -> dict:
    """A `/v1/models` entry, keyed and computed like routstr-core's."""
    limit = model.completion_token_limit
    prompt, completion, request = (model.prompt_sats_per_token, model.completion_sats_per_token,
                                   model.request_sats)
    # The most one request can cost: a full context, `limit` tokens of it generated, plus the fee.
    sats = {"prompt": prompt, "completion": completion, "request": request, "image": 0.0, "web_search": 0.0,
            "internal_reasoning": 0.0, "input_cache_read": 0.0, "input_cache_write": 0.0,
            "max_prompt_cost": model.context_length * prompt,
            "max_completion_cost": limit * completion,
            "max_cost": (model.context_length - limit) * prompt + limit * completion + request}
    return {
        "id": model.id, "name": model.id, "created": 0,
        "description": f"{model.id} on a mock Routstr provider",
        "context_length": model.context_length,
        "architecture": {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"],
                         "tokenizer": "mock", "instruct_type": None},
        "pricing": {key: value * USD_PER_SAT for key, value in sats.items()},
        "sats_pricing": sats,
        "per_request_limits": None,
        "top_provider": {"context_length": model.context_length, "max_completion_tokens": limit,
                         "is_moderated": False},
        "enabled": model.enabled, "upstream_provider_id": PROVIDER_ID,
        "canonical_slug": None, "alias_ids": None, "forwarded_model_id": None,
    }


@dataclass(frozen=True)
class _Charge:
    """What one completion costs, in msats, split as Routstr reports it."""

    input_msats: int
    output_msats: int
    base_msats: int

    @property
    def total_msats(self) -> int:
        return self.input_msats + self.output_msats + self.base_msats

    @property
    def total_usd(self) -> float:
        return float(Decimal(self.total_msats) / MSATS_PER_USD)


@dataclass(frozen=True)
class _Completion:
    """A validated chat request and the answer the mock will give it."""

    model: MockModel
    stream: bool
    prompt_tokens: int
    words: list[str]
    finish_reason: str
    charge: _Charge
    reserve_msats: int

    def cost_fields(self) -> dict:
        """Routstr's cost object, without the balance fields."""
        charge = self.charge
        return {"base_msats": charge.base_msats, "input_msats": charge.input_msats,
                "output_msats": charge.output_msats, "total_msats": charge.total_msats,
                "total_usd": charge.total_usd, "input_tokens": self.prompt_tokens,
                "output_tokens": len(self.words), "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0, "cache_read_msats": 0, "cache_creation_msats": 0}

    def usage(self, remaining_msats: int) -> dict:
        charge = self.charge
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.words),
                "total_tokens": self.prompt_tokens + len(self.words),
                "cost": {"base_msats": charge.base_msats, "input_msats": charge.input_msats,
                         "output_msats": charge.output_msats, "total_msats": charge.total_msats,
                         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                         "cache_read_msats": 0, "cache_creation_msats": 0, "total_usd": charge.total_usd},
                "cost_sats": charge.total_msats // 1000,
                "remaining_balance_msats": remaining_msats}


@dataclass
class _Account:
    """A balance as the node keeps it per API key (or per Cashu token used as a key)."""

    balance: int = INITIAL_BALANCE_MSATS
    reserved: int = 0
    total_spent: int = 0
    total_requests: int = 0


class _Connection:
    """One client connection: HTTP/1.1 response framing over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = http1.MessageReader(reader)
        self.keep_alive = True
        self.chunked = True

    async def read_request(self) -> ReceivedRequest | None:
        """The next request, or None when the client closed the connection between requests."""
        try:
            head = await self.messages.request_head()
        except http1.ClosedBeforeHead as error:
            if error.received:
                raise _BadRequest(str(error)) from error
            return None
        except http1.Http1Error as error:
            raise _BadRequest(str(error)) from error
        if head.body_size > MAX_BODY_BYTES:
            raise _BadRequest("bad content-length")
        if not head.path.startswith("/"):
            raise _BadRequest("bad request target")
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in head.headers]
        self.chunked = head.http11
        self.keep_alive = head.keep_alive
        if any(name == "expect" and value.lower() == "100-continue" for name, value in headers):
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await self.messages.body(limit=MAX_BODY_BYTES)
        except http1.Http1Error as error:
            raise _BadRequest(str(error)) from error
        return ReceivedRequest(head.method, head.path, headers, body)

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        if not self.keep_alive:
            headers = [*headers, ("connection", "close")]
        lines = [f"HTTP/1.1 {status} {phrase}", *(f"{name}: {value}" for name, value in headers), "", ""]
        return "\r\n".join(lines).encode("latin-1")

    async def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole response; `headers` must include content-length."""
        self.writer.write(self._head(status, headers) + body)
        await self.writer.drain()

    async def send_json(self, status: int, body: bytes, request_id: str,
                        extra_headers: Sequence[tuple[str, str]] = ()) -> None:
        """A JSON answer with the headers a Routstr node puts on everything but chat completions."""
        await self.send(status, [("date", _http_date()), ("server", "uvicorn"), ("content-length", str(len(body))),
                                 ("content-type", "application/json"), ("x-routstr-request-id", request_id),
                                 *extra_headers], body)

    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.chunked:
            headers = [*headers, ("Transfer-Encoding", "chunked")]
        else:
            self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        self.writer.write(self._head(status, headers))
        await self.writer.drain()

    async def send_chunk(self, data: bytes) -> None:
        """One piece of a streamed body, sent at once as its own HTTP chunk."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        await self.writer.drain()

    async def end_stream(self) -> None:
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()

    def cut(self) -> None:
        """Close mid-response: the client sees a body that never ends properly."""
        self.keep_alive = False
        self.writer.close()

    async def wait_for_disconnect(self) -> None:
        self.keep_alive = False
        while await self.reader.read(65536):
            pass


async def _accept_tls(connection: socket.socket, context: ssl.SSLContext) -> tuple[asyncio.StreamReader,
                                                                                 asyncio.StreamWriter]:
    """The server side of a TLS handshake on an accepted socket, as asyncio streams."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, connection, ssl=context,
                                                      ssl_handshake_timeout=10)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def private_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA of its own and a certificate it issued for localhost and 127.0.0.1, for an HTTPS mock
    node: the CA's PEM file (what a client must trust: `ca_file`) and the node's server context."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1), "not_valid_after": now + datetime.timedelta(days=2)}

    def certificate(subject: str, issuer: x509.Name, public_key, signer, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arbstr mock CA")])
    ca = certificate("arbstr mock CA", ca_name, ca_key.public_key(), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True)])
    leaf = certificate("localhost", ca_name, key.public_key(), ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "mock-ca.pem", directory / "mock-node.pem", directory / "mock-node.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context


def _change_token() -> str:
    """A fresh fake Cashu token for the `X-Cashu` change header (not real ecash)."""
    return "cashuB" + base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")


def _is_cashu_token(value: str) -> bool:
    return value.startswith(("cashuA", "cashuB"))


class MockProvider:
    """A Routstr provider node on loopback, with prices, balances and fault injection.

    Chat completions are deterministic: the reply is `reply` (default "Hello from NAME");
    prompt_tokens are counted by `count_prompt_tokens`, completion_tokens are the words of the
    reply, which is cut to `max_completion_tokens`/`max_tokens` (finish_reason "length").
    Costs in msats: input = ceil(prompt_tokens × prompt price × 1000), output = ceil(
    completion_tokens × completion price × 1000), base = 0 as on routstr-core v0.4.5 (the
    request fee × 1000 rounded half up for a model with `bills_request_fee`);
    `cost_sats` is the total // 1000, as the real node rounds down.

    Every key starts with INITIAL_BALANCE_MSATS. Before answering, the node reserves the most the
    request can cost (its prompt cost, a full `max_tokens` or model-limit completion, and the
    fee) and answers 402 when that exceeds the available balance; the real cost is charged when
    the answer is complete, and the reservation released when it is not.

    Fault injection (settable from any thread at any time) applies to POST /v1/chat/completions;
    `overcharge` bills (and reports) that many times the advertised token prices, as a dishonest
    node would.
    """

    def __init__(self, name: str = "mock", models: list[MockModel] | None = None, *,
                 api_keys: set[str] | None = None, latency: float = 0.0, chunk_delay: float = 0.0,
                 reply: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls`: serve HTTPS with this server context (see `private_ca`) instead of plain HTTP."""
        self.name = name
        self.tls = tls
        self.tls_handshakes = 0
        """TLS handshakes completed: how many connections clients opened, pooling or not."""
        self._models = {model.id: model for model in (_default_models() if models is None else models)}
        self.api_keys = api_keys
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.reply = f"Hello from {name}" if reply is None else reply
        self.host = host
        self.fail_status: int | None = None
        self.hang = False
        self.omit_usage = False
        self.cut_stream_after: int | None = None
        self.echo_key = False
        """A hostile node: quote the credential it received in every error's message and headers."""
        self.overcharge = 1.0
        self.requests: list[ReceivedRequest] = []
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._routes = {
            "/v1/chat/completions": {"POST": self._chat_completions},
            "/v1/models": {"GET": self._list_models},
            "/v1/info": {"GET": self._info},
            "/v1/balance/info": {"GET": self._balance_info},
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MockProvider:
        """Bind and listen (OSError if the port is taken), then serve from a daemon thread; returns self."""
        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self._requested_port), family=family, backlog=4096)
        listener.setblocking(False)
        loop = asyncio.new_event_loop()
        self._accepting = loop.create_task(self._accept_connections(listener))
        self._listener, self._loop, self._port = listener, loop, listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run_loop, name=f"mock-provider-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def stop(self) -> None:
        """Close the listener and every open connection, and join the thread; idempotent."""
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._loop = self._listener = self._accepting = None

    async def _shutdown(self) -> None:
        self._accepting.cancel()
        await asyncio.gather(self._accepting, return_exceptions=True)
        self._listener.close()
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept_connections(self, listener: socket.socket) -> None:
        """Accept and register each connection in one task, so stop() sees every accepted one."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listener)
                # asyncio sets TCP_NODELAY only on sockets it creates itself; without it each
                # stream chunk would wait ~40 ms for the peer's delayed ACK (Nagle).
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is None:
                    reader, writer = await asyncio.open_connection(sock=connection, limit=MAX_HEAD_BYTES)
                else:
                    reader, writer = await _accept_tls(connection, self.tls)
                    self.tls_handshakes += 1
            except (OSError, TimeoutError):
                # E.g. out of file descriptors: back off instead of spinning on the same error.
                _log.warning("mock provider %s: accepting a connection failed", self.name, exc_info=True)
                await asyncio.sleep(0.1)
                continue
            self._connections[loop.create_task(self._serve_connection(reader, writer))] = writer

    def __enter__(self) -> MockProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("mock provider not started")
        return self._port

    @property
    def url(self) -> str:
        """The OpenAI base URL of this provider."""
        return f"{self._origin}/v1"

    @property
    def _origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    # -- state for tests ---------------------------------------------------------------------

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def set_model(self, model: MockModel) -> None:
        """Serve `model` from now on, replacing any model of that id: a price change, a model
        switched on or off (`enabled`), or a new one, as a node's /v1/models shows it next."""
        self._models = {**self._models, model.id: model}

    def remove_model(self, model_id: str) -> None:
        """Stop serving a model: gone from /v1/models, answered 400 invalid_model."""
        self._models = {k: v for k, v in self._models.items() if k != model_id}

    def set_balance(self, key: str, msats: int) -> None:
        """Set the balance of an API key (or Cashu token used as a key), e.g. to make it poor."""
        with self._lock:
            self._accounts.setdefault(key, _Account()).balance = msats

    def _reserve(self, key: str | None, msats: int) -> _Account:
        """Hold `msats` of the key's balance (a pay-per-request token gets a fresh one), or 402."""
        with self._lock:
            account = _Account() if key is None else self._accounts.setdefault(key, _Account())
            available = account.balance - account.reserved
            if msats > available:
                message = (f"Insufficient balance: {_sats_text(msats)} sats ({msats} msats) required for this "
                           f"model; {_sats_text(available)} sats ({available} msats) available.")
                raise _ApiError(402, message, "insufficient_quota", "insufficient_balance")
            account.reserved += msats
            return account

    def _settle(self, account: _Account, reserved: int, cost: int) -> int:
        """Charge `cost` against a reservation; returns the remaining balance."""
        with self._lock:
            account.reserved -= reserved
            account.balance -= cost
            account.total_spent += cost
            account.total_requests += 1
            return account.balance

    def _release(self, account: _Account, reserved: int) -> None:
        with self._lock:
            account.reserved -= reserved

    # -- HTTP --------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(reader, writer)
        try:
            while connection.keep_alive:
                try:
                    request = await connection.read_request()
                except _BadRequest:
                    writer.write(_BAD_REQUEST)
                    await writer.drain()
                    break
                if request is None:
                    break
                with self._lock:
                    self.requests.append(request)
                await self._dispatch(request, connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request
        except Exception:
            _log.exception("mock provider %s: answering a request failed", self.name)
        finally:
            self._connections.pop(asyncio.current_task(), None)
            writer.close()

    async def _dispatch(self, request: ReceivedRequest, connection: _Connection) -> None:
        handlers = self._routes.get(request.path.partition("?")[0])
        if handlers is None:
            await connection.send_json(404, _compact({"detail": "Not Found"}), str(uuid.uuid4()))
        elif (handler := handlers.get(request.method)) is None:
            await connection.send_json(405, _compact({"detail": "Method Not Allowed"}), str(uuid.uuid4()),
                                       [("allow", ", ".join(handlers))])
        else:
            await handler(request, connection)

    async def _list_models(self, request: ReceivedRequest, connection: _Connection) -> None:
        body = _compact({"data": [_model_entry(model) for model in self._models.values()]})
        await connection.send_json(200, body, str(uuid.uuid4()))

    async def _info(self, request: ReceivedRequest, connection: _Connection) -> None:
        npub_chars = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"  # bech32's alphabet
        digest = hashlib.sha256(self.name.encode()).digest()
        npub = "npub1" + "".join(npub_chars[byte % 32] for byte in digest + digest[:26])
        body = _compact({"name": self.name, "description": f"Mock Routstr provider {self.name}",
                         "version": ROUTSTR_VERSION, "npub": npub, "mints": ["https://mint.mock.invalid"],
                         "http_url": self._origin, "onion_url": None})
        await connection.send_json(200, body, str(uuid.uuid4()))

    async def _balance_info(self, request: ReceivedRequest, connection: _Connection) -> None:
        request_id = str(uuid.uuid4())
        try:
            key = self._bearer_key(request)
            if key is None:
                raise _ApiError(401, "API key or Cashu token required", "invalid_request_error", "invalid_api_key")
        except _ApiError as error:
            await connection.send_json(error.status, error.body(request_id), request_id)
            return
        with self._lock:
            account = self._accounts.setdefault(key, _Account())
            # A Cashu token used as a key is redeemed into an sk- key; never echo the token itself.
            api_key = key if key.startswith("sk-") else "sk-" + hashlib.sha256(key.encode()).hexdigest()
            body = _compact({"api_key": api_key, "balance": account.balance, "reserved": account.reserved,
                             "is_child": False, "total_requests": account.total_requests,
                             "total_spent": account.total_spent, "balance_limit": None,
                             "balance_limit_reset": None, "validity_date": None})
        await connection.send_json(200, body, request_id)

    def _bearer_key(self, request: ReceivedRequest) -> str | None:
        """The key in `Authorization: Bearer`, None without that header; 401 for a bad one."""
        authorization = request.header("authorization")
        if authorization is None:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        well_formed = key.startswith("sk-") or _is_cashu_token(key)
        accepted = well_formed if self.api_keys is None else key in self.api_keys
        if scheme.lower() != "bearer" or not accepted:
            message = "Invalid or expired API key" if well_formed else _INVALID_KEY_FORMAT
            raise _ApiError(401, message, "invalid_request_error", "invalid_api_key")
        return key

    def _plan_completion(self, request: ReceivedRequest) -> _Completion:
        try:
            body = request.json()
        except ValueError as error:
            raise _invalid_request("Invalid JSON in request body") from error
        if not isinstance(body, dict):
            raise _invalid_request("Request body must be a JSON object")
        model_id = body.get("model")
        if not isinstance(model_id, str):
            raise _invalid_request("Request body must name a 'model'")
        model = self._models.get(model_id)
        if model is None or not model.enabled:
            raise _invalid_model(model_id)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _invalid_request("'messages' must be a non-empty list of message objects")
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool)
                                      or requested < 1):
            raise _invalid_request("'max_tokens' must be a positive integer")
        limit = min(requested or model.completion_token_limit, model.completion_token_limit)
        words = self.reply.split()
        finish_reason = "length" if len(words) > limit else "stop"
        words = words[:limit]
        prompt_tokens = count_prompt_tokens(messages)
        factor = Decimal(str(self.overcharge))
        charge = _Charge(_msats(prompt_tokens, model.prompt_sats_per_token, factor),
                         _msats(len(words), model.completion_sats_per_token, factor),
                         _request_fee_msats(model) if model.bills_request_fee else 0)
        reserve = charge.input_msats + _msats(limit, model.completion_sats_per_token) + _request_fee_msats(model)
        return _Completion(model, body.get("stream") is True, prompt_tokens, words, finish_reason, charge, reserve)

    async def _chat_completions(self, request: ReceivedRequest, connection: _Connection) -> None:
        request_id = str(uuid.uuid4())
        if self.hang:
            await connection.wait_for_disconnect()
            return
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        # Pay-per-request: the node answers with change (or a refund, on failure) in `X-Cashu`.
        paid_token = request.header("x-cashu") if request.header("authorization") is None else None
        cashu_headers = [("X-Cashu", _change_token())] if paid_token and _is_cashu_token(paid_token) else []
        try:
            if (status := self.fail_status) is not None:
                raise _injected_error(status, _requested_model(request))
            key = self._bearer_key(request)
            if key is None and not cashu_headers:
                raise _ApiError(401, _INVALID_KEY_FORMAT, "invalid_request_error", "invalid_api_key")
            completion = self._plan_completion(request)
            account = self._reserve(key, completion.reserve_msats)
        except _ApiError as error:
            if self.echo_key:
                received = request.header("authorization") or request.header("x-cashu") or ""
                error.error["message"] += f" (you sent: {received})"
                cashu_headers = [*cashu_headers, ("x-debug-credential", received)]
            await connection.send_json(error.status, error.body(request_id), request_id, cashu_headers)
            return
        settled = False
        try:
            if completion.stream:
                try:
                    settled = await self._stream_completion(completion, account, connection, request_id,
                                                            cashu_headers)
                except ConnectionError:
                    # A Routstr node keeps reading its upstream when its client leaves mid-stream and
                    # bills the whole answer (measured on routstr-core v0.4.5).
                    self._settle(account, completion.reserve_msats, completion.charge.total_msats)
                    settled = True
                    raise
            else:
                remaining = self._settle(account, completion.reserve_msats, completion.charge.total_msats)
                settled = True
                await self._send_completion(completion, remaining, connection, request_id, cashu_headers)
        finally:
            if not settled:
                self._release(account, completion.reserve_msats)

    async def _send_completion(self, completion: _Completion, remaining: int, connection: _Connection,
                               request_id: str, extra_headers: list[tuple[str, str]]) -> None:
        body = {"id": f"chatcmpl-{secrets.token_hex(4)}", "object": "chat.completion", "created": int(time.time()),
                "model": completion.model.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(completion.words)},
                             "finish_reason": completion.finish_reason}]}
        date = _http_date()
        headers = [("date", date), ("server", "uvicorn"), ("date", date), ("content-type", "application/json")]
        if self.omit_usage:
            body["provider"] = PROVIDER_ID
        else:
            cost = {**completion.cost_fields(), "sats_cost": completion.charge.total_msats // 1000,
                    "remaining_balance_msats": remaining}
            body.update({"usage": completion.usage(remaining), "provider": PROVIDER_ID,
                         "metadata": {"routstr": {"cost": cost}}, "cost": cost})
            charge = completion.charge
            headers += [("x-routstr-cost-msats", str(charge.total_msats)),
                        ("x-routstr-input-cost-msats", str(charge.input_msats)),
                        ("x-routstr-output-cost-msats", str(charge.output_msats)),
                        ("x-routstr-cost-usd", repr(charge.total_usd))]
        encoded = json.dumps(body).encode()
        headers += [("content-length", str(len(encoded))), ("x-routstr-request-id", request_id), *extra_headers]
        await connection.send(200, headers, encoded)

    async def _stream_completion(self, completion: _Completion, account: _Account, connection: _Connection,
                                 request_id: str, extra_headers: list[tuple[str, str]]) -> bool:
        """Stream the answer as Routstr does; returns whether it was charged (i.e. it completed)."""
        cut_after, omit_usage = self.cut_stream_after, self.omit_usage
        date = _http_date()
        await connection.start_stream(200, [("date", date), ("server", "uvicorn"), ("date", date),
                                            ("server", "uvicorn"),
                                            ("content-type", "text/event-stream; charset=utf-8"),
                                            ("x-routstr-request-id", request_id), *extra_headers])
        chunk_id, created = f"chatcmpl-{secrets.token_hex(4)}", int(time.time())

        def event(choices: list[dict]) -> bytes:
            return b"data: %s\n\n" % json.dumps(
                {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": completion.model.id,
                 "choices": choices, "provider": PROVIDER_ID}).encode()

        for sent, word in enumerate(completion.words[:cut_after]):
            if sent and self.chunk_delay > 0:
                await asyncio.sleep(self.chunk_delay)
            await connection.send_chunk(event([{"index": 0, "delta": {"content": f"{word} "},
                                                "finish_reason": None}]))
        if cut_after is not None and cut_after <= len(completion.words):
            connection.cut()
            return False
        await connection.send_chunk(event([{"index": 0, "delta": {}, "finish_reason": completion.finish_reason}]))
        remaining = self._settle(account, completion.reserve_msats, completion.charge.total_msats)
        if not omit_usage:
            # Routstr forces usage upstream and always ends with this chunk, asked for or not.
            sats_cost = completion.charge.total_msats // 1000
            usage_chunk = {"id": chunk_id, "object": "chat.completion.chunk", "model": completion.model.id,
                           "choices": [], "usage": completion.usage(remaining), "provider": PROVIDER_ID,
                           "metadata": {"routstr": {"cost": completion.cost_fields(), "sats_cost": sats_cost,
                                                    "remaining_balance_msats": remaining}},
                           "cost": {**completion.cost_fields(), "sats_cost": sats_cost,
                                    "remaining_balance_msats": remaining}}
            await connection.send_chunk(b"data: %s\n\n" % json.dumps(usage_chunk).encode())
        await connection.send_chunk(b"data: [DONE]\n\n")
        await connection.end_stream()
        return True


def _requested_model(request: ReceivedRequest) -> object:
    """The model a chat request names, for error messages; None when the body does not say."""
    try:
        body = request.json()
    except ValueError:
        return None
    return body.get("model") if isinstance(body, dict) else None


def _parse_model(spec: str) -> MockModel:
    """`ID:PROMPT_SATS_PER_TOKEN:COMPLETION_SATS_PER_TOKEN`; the id may itself contain colons."""
    model_id, prompt, completion = spec.rsplit(":", 2)
    return MockModel(model_id, float(prompt), float(completion))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve one mock Routstr provider until Ctrl-C.")
    parser.add_argument("--name", default="mock")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", dest="models", action="append", type=_parse_model, metavar="ID:PROMPT:COMPLETION",
                        help="a model and its prices in sats per token (repeatable; default: two sample models)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each chat completion answers")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    args = parser.parse_args(argv)
    provider = MockProvider(args.name, args.models, latency=args.latency, chunk_delay=args.chunk_delay,
                            host=args.host, port=args.port).start()
    # Started as a background job of a non-interactive shell, a process inherits SIGINT ignored and
    # Python then never raises KeyboardInterrupt: Ctrl-C (or a test's SIGINT) would not stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(provider.url, flush=True)  # in the try: a Ctrl-C right after it still stops cleanly
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()


if __name__ == "__main__":
    main()
