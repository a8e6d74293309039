"""The mitmproxy addon: the only module that knows mitmproxy. It translates hooks into engine calls.

request          -> local endpoint, or decide + dispatch (see arbstr.upstream for why arbstr sends)
responseheaders  -> stamp x-arbstr-* headers; switch streaming on for relayed streams
response         -> say in mitmweb what happened
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.exceptions import OptionsError

from arbstr.config import Config, load_config
from arbstr.engine import Decision, Engine
from arbstr.errors import ArbstrError, MethodNotAllowed, NotFound
from arbstr.localapi import ENDPOINTS
from arbstr.pricing import format_sats
from arbstr.router import Candidate
from arbstr.upstream import Attempt, Dispatcher, ProviderResponse, StreamRelay

log = logging.getLogger("arbstr")

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
PROVIDER_CHAT_PATH = "/chat/completions"
CLIENT_ONLY_HEADERS = ("authorization", "api-key", "cookie", "proxy-authorization", "x-api-key")
"""Headers that belong to the client and are removed from the flow before anything else sees it."""
META = "arbstr"


def config_path(option: str) -> str:
    return option or os.environ.get("ARBSTR_CONFIG") or "config.toml"


class ArbstrAddon:
    def __init__(self, config: Config | None = None) -> None:
        self._given_config = config
        self.engine: Engine | None = None
        self._dispatcher: Dispatcher | None = None
        self._relay: StreamRelay | None = None

    def load(self, loader) -> None:
        loader.add_option("arbstr_config", str, "",
                          "Path of arbstr's config file (default: $ARBSTR_CONFIG, else ./config.toml).")

    def configure(self, updated: set[str]) -> None:
        if self._given_config is not None:
            if self.engine is None:
                self.use(self._given_config)
            return
        if "arbstr_config" in updated or self.engine is None:
            path = config_path(ctx.options.arbstr_config)
            try:
                self.use(load_config(path))
            except ArbstrError as exc:
                raise OptionsError(exc.message) from None

    def use(self, config: Config) -> None:
        """Route with this configuration from the next request on."""
        self.engine = Engine(config)
        old, self._dispatcher = self._dispatcher, None
        if old is not None:
            ctx.master.event_loop.create_task(old.aclose()) if ctx.master else None

    async def done(self) -> None:
        if self._relay:
            await self._relay.stop()
        if self._dispatcher:
            await self._dispatcher.aclose()

    async def _upstream(self) -> tuple[Dispatcher, StreamRelay]:
        assert self.engine is not None
        if self._relay is None:
            self._relay = StreamRelay()
            await self._relay.start()
        if self._dispatcher is None:
            routing = self.engine.config.routing
            self._dispatcher = Dispatcher(self.engine.endpoints, routing.connect_timeout, routing.header_timeout)
        return self._dispatcher, self._relay

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.engine is None:
            return
        engine = self.engine
        path = flow.request.path.split("?", 1)[0].rstrip("/") or "/"
        method = flow.request.method
        flow.metadata[META] = {}
        try:
            if path in CHAT_PATHS:
                if method != "POST":
                    raise MethodNotAllowed(f"{path} takes POST, not {method}.")
                await self._route(flow, engine)
            elif path in ENDPOINTS:
                if method != "GET":
                    raise MethodNotAllowed(f"{path} takes GET, not {method}.")
                status, payload = ENDPOINTS[path](engine)
                flow.metadata[META]["local"] = path
                flow.comment = f"arbstr: local {path}"
                flow.response = json_response(status, payload)
            else:
                raise NotFound(f"arbstr has no endpoint {method} {path}; chat goes to POST /v1/chat/completions.")
        except ArbstrError as exc:
            flow.metadata[META]["error"] = exc.code
            flow.comment = f"arbstr: {exc.code}: {exc.message}"
            flow.marked = ":warning:"
            flow.response = json_response(exc.status, exc.to_payload())

    async def _route(self, flow: http.HTTPFlow, engine: Engine) -> None:
        body = flow.request.raw_content or b""
        meta = flow.metadata[META]
        meta["request_id"] = uuid.uuid4().hex
        decision = engine.decide(meta["request_id"], body, flow.request.headers.get("x-arbstr-policy"))
        meta.update(policy=decision.policy.name, model=decision.chat.model)
        client_headers = list(flow.request.headers.items())
        for name in CLIENT_ONLY_HEADERS:
            flow.request.headers.pop(name, None)
        for name in [n for n in flow.request.headers if n.lower().startswith("x-arbstr-")]:
            flow.request.headers.pop(name, None)
        dispatcher, relay = await self._upstream()
        try:
            answer, attempts = await dispatcher.send(decision.plan, PROVIDER_CHAT_PATH, body, client_headers)
        except ArbstrError:
            meta["attempts"] = "failed"
            raise
        chosen = decision.plan.candidate(answer.provider)
        meta.update(provider=answer.provider, attempts=_attempts_header(attempts),
                    estimated_sats=str(chosen.estimated_cost))
        flow.request.url = engine.endpoints[answer.provider].base_url + PROVIDER_CHAT_PATH
        flow.request.host_header = flow.request.authority or f"{flow.request.host}:{flow.request.port}"
        flow.comment = _comment(decision, chosen, attempts)
        if len(attempts) > 1:
            flow.marked = ":arrows_counterclockwise:"
        if decision.chat.stream and 200 <= answer.status < 300:
            self._hand_stream_to_mitmproxy(flow, relay, answer)
        else:
            flow.response = await _whole_response(answer)

    @staticmethod
    def _hand_stream_to_mitmproxy(flow: http.HTTPFlow, relay: StreamRelay, answer: ProviderResponse) -> None:
        """Point the flow at the relay; the URL shown in mitmweb stays the provider's (Host header kept)."""
        ticket = relay.register(answer)
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = relay.port
        flow.request.headers[StreamRelay.TICKET_HEADER] = ticket
        flow.metadata[META]["relayed"] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or flow.response is None:
            return
        if meta.get("relayed"):
            flow.response.stream = True
            flow.request.headers.pop(StreamRelay.TICKET_HEADER, None)
        headers = flow.response.headers
        if "request_id" in meta:
            headers["x-arbstr-request-id"] = meta["request_id"]
        if "provider" in meta:
            headers["x-arbstr-provider"] = meta["provider"]
            headers["x-arbstr-policy"] = meta["policy"]
            headers["x-arbstr-attempts"] = meta["attempts"]


def json_response(status: int, payload: dict[str, Any]) -> http.Response:
    return http.Response.make(status, json.dumps(payload).encode(), {"content-type": "application/json"})


async def _whole_response(answer: ProviderResponse) -> http.Response:
    """The provider's answer as the flow's response, byte for byte, with `arbstr_provider` in a JSON object."""
    raw = await answer.read()
    headers = http.Headers(answer.headers)
    is_plain_json = ("json" in headers.get("content-type", "") and "content-encoding" not in headers
                     and raw[:1] == b"{")
    if is_plain_json and 200 <= answer.status < 300:
        raw = _add_provider_field(raw, answer.provider)
    headers["content-length"] = str(len(raw))
    return http.Response(b"HTTP/1.1", answer.status, answer.reason.encode("ascii", "replace"), headers, raw,
                         None, time.time(), time.time())


def _add_provider_field(raw: bytes, provider: str) -> bytes:
    """Insert `"arbstr_provider"` as the object's first key without re-encoding the provider's JSON."""
    rest = raw[1:].lstrip()
    separator = b"" if rest.startswith(b"}") else b", "
    return b'{"arbstr_provider": ' + json.dumps(provider).encode() + separator + rest


def _attempts_header(attempts: list[Attempt]) -> str:
    """Who failed and why, before the provider that answered: `alpha=connect; beta=status 503`."""
    failed = [a for a in attempts if a.outcome != "ok"]
    return "; ".join(f"{a.provider}={a.outcome}{f' {a.status}' if a.status else ''}" for a in failed) or "none"


def _comment(decision: Decision, chosen: Candidate, attempts: list[Attempt]) -> str:
    text = (f"arbstr: provider={chosen.provider} policy={decision.policy.name} model={decision.chat.model} "
            f"estimated={format_sats(chosen.estimated_cost)} sats")
    failed = [a.describe() for a in attempts if a.outcome != "ok"]
    return text + (f" after failing: {'; '.join(failed)}" if failed else "")
