"""Shared fixtures: config text builders and Routstr-like mock providers on free loopback ports."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arbstr.config import Config, parse_config
from arbstr.logs import ArbstrLogHandler
from arbstr.mock import MockModel, MockProvider


def provider_toml(name: str, url: str, models: list[str], input_rate: float, output_rate: float,
                  base_fee: float = 0, api_key: str | None = None) -> str:
    key = f'api_key = "{api_key or "sk-" + name + "-0123456789abcdef"}"\n'
    return (f'[[providers]]\nname = "{name}"\nurl = "{url}"\n{key}'
            f'models = {models!r}\ninput_rate = {input_rate}\noutput_rate = {output_rate}\nbase_fee = {base_fee}\n'
            ).replace("'", '"')


def make_config(*providers: str, extra: str = "") -> Config:
    return parse_config("\n".join(providers) + "\n" + extra, environ={})


@pytest.fixture
def start_provider() -> Iterator:
    """Start Routstr-like mock providers; all are stopped when the test ends."""
    started: list[MockProvider] = []

    def start(name: str, models: list[str], prompt: float, completion: float, request: float = 0.0,
              *, fail_status: int | None = None, context_length: int = 8192, max_completion_tokens: int | None = None,
              bills_request_fee: bool = False, **kwargs) -> MockProvider:
        """`context_length` and `max_completion_tokens` set each model's limits, and so the `max_cost` it lists;
        `bills_request_fee` makes it bill the `request` fee it advertises (v0.4.5 nodes do not)."""
        provider = MockProvider(name, [MockModel(m, prompt, completion, request, context_length,
                                                 max_completion_tokens=max_completion_tokens,
                                                 bills_request_fee=bills_request_fee) for m in models], **kwargs)
        provider.fail_status = fail_status
        started.append(provider.start())
        return provider

    yield start
    for provider in started:
        provider.stop()


class Webhook:
    """An alert webhook on loopback: answers each POST, once `release` is set, with the next of
    `statuses` (204 when they run out), and records every POST as (status, JSON body)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.posts: list[tuple[int, dict]] = []
        self.release = threading.Event()
        self.release.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hook.release.wait(60)
                status = hook.statuses.pop(0) if hook.statuses else 204
                hook.posts.append((status, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    @property
    def delivered(self) -> list[dict]:
        """The bodies the webhook took (answered 2xx)."""
        return [body for status, body in self.posts if status < 300]

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def chat_requests(provider: MockProvider) -> list:
    """The chat completions a provider received (health probes of /v1/models left out)."""
    return [r for r in provider.requests if r.path.startswith("/v1/chat/completions")]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """arbstr's log settings (applied by every addon that configures) are process-wide: undo them
    after each test, so pytest's caplog sees arbstr's records again."""
    yield
    for name in ("arbstr", "peewee"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, ArbstrLogHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


@pytest.fixture(scope="session")
def cashu_mint() -> Iterator:
    """A real nutshell mint (FakeWallet: every invoice is paid at once), shared by the session's tests."""
    from arbstr.testing.mint import TestMint
    with TestMint() as mint:
        yield mint


FUNDED_SATS = 2000
"""What the `wallet` fixture holds."""


@pytest.fixture
def node(cashu_mint) -> Iterator:
    """A fake Routstr node named "node" that redeems tokens at the test mint."""
    from arbstr.testing.cashunode import CashuNode
    node = CashuNode("node", [MockModel("gpt-4o", 0.5, 1.5)], mint_url=cashu_mint.url,
                     reply="one two three four five six seven eight").start()
    yield node
    node.stop()


@pytest.fixture
def wallet(cashu_mint, tmp_path) -> Iterator:
    """A wallet in tmp_path/wallet.db holding FUNDED_SATS from the test mint."""
    import asyncio

    from arbstr.store import Ledger
    from arbstr.wallet import Wallet
    ledger = Ledger(str(tmp_path / "wallet.db"), flush_interval=0)
    wallet = Wallet(ledger, [cashu_mint.url])

    async def fund() -> None:
        op, _ = await wallet.request_topup(FUNDED_SATS)
        await wallet.finish_topup(op)
    asyncio.run(fund())
    yield wallet
    ledger.close()


def at(text: str) -> float:
    """Unix time of an ISO 8601 UTC time such as 2026-11-25T10:00:00."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class FakeClock:
    """A clock a test moves by hand: set `now`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
