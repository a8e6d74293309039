"""The mitmproxy addon: it translates mitmproxy's hooks into engine calls (server.py only assembles the master).

next_layer       -> HTTP/2 for cleartext prior-knowledge clients; HTTP/1 heads over the limits refused unparsed
tls_clienthello  -> regular mode: leave TLS to hosts arbstr does not intercept undecrypted
requestheaders   -> auth token, body limit; the client's credentials leave the flow
request          -> a local endpoint, or decide + dispatch (see arbstr.exchange for why arbstr sends)
responseheaders  -> switch streaming on for streams handed over through the relay
response         -> wait for a stream's settlement, so mitmweb shows its actual cost
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import brotli
from mitmproxy import connection, ctx, http, optmanager, tls
from mitmproxy.connection import ConnectionState
from mitmproxy.exceptions import OptionsError
from mitmproxy.net import encoding
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.utils import asyncio_utils

from arbstr import dashboard, http1
from arbstr.attribution import APP_HEADERS, app_of
from arbstr.budgets import HEARTBEAT_INTERVAL, BudgetExceeded, RequestBudget
from arbstr.clientlimits import HeadDeadlines, check_head_size, choose_http_server
from arbstr.config import Config, ServerConfig, is_loopback, load_config
from arbstr.connect import connector_for
from arbstr.engine import Decision, Engine, Outcome
from arbstr.errors import ArbstrError, InvalidRequest, MethodNotAllowed, NotFound, TooLarge, Unauthorized
from arbstr.exchange import (FORWARDED_REQUEST_HEADERS, AllProvidersFailed, Attempt, CannotPay, ClientGone, Dispatcher,
                             EndState, Exchange, OutboundRequest, failures_of, paid_by_failures,
                             summarize_attempts)
from arbstr.flowview import (ERROR_MARK, FAILOVER_MARK, SHOWN, AttemptView, BoundedCopy, RelayOutOfTheLog,
                             RouteSummary, UntilShown, attempt_comment, attempt_flow, route_comment, show_local,
                             show_sent, show_server, shown)
from arbstr.httpclient import HttpClient
from arbstr.localapi import BALANCE_MAX_AGE, ENDPOINTS, PAGES, PUBLIC_ENDPOINTS, refresh_balances
from arbstr.logs import configure_logging
from arbstr.metrics import Metrics
from arbstr.pricing import exact_sats
from arbstr.proxyauth import TokenProxyAuth
from arbstr.relay import StreamRelay, StreamTap
from arbstr.redact import redact_bytes, remember
from arbstr.store import Ledger, RequestRecord, redact_url
from arbstr.usage import COST_HEADER, StreamUsageObserver, UsageReport, cost_msats_from_headers, usage_from_json

if TYPE_CHECKING:
    from arbstr.payment import WalletPayments
    from arbstr.wallet import Wallet

log = logging.getLogger("arbstr")
MITMPROXY_CONNECTIONS = logging.getLogger("mitmproxy.proxy.server")
"""Where mitmproxy logs the connections it opens and closes."""
SHUTDOWN_REFUNDS = 30.0
"""Seconds arbstr may spend at exit paying wallet-funded keys back into the wallet."""

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
INTERCEPTED_PATHS = CHAT_PATHS | {"/v1/models"}
"""What arbstr takes over on an intercepted host in regular mode."""
PROVIDER_CHAT_PATH = "/chat/completions"
CLIENT_ONLY_HEADERS = ("authorization", "api-key", "cookie", "proxy-authorization", "x-api-key")
"""Headers that belong to the client and are removed from the flow before anything else sees it."""
META = "arbstr"
ROUTING_HEADERS = frozenset({"x-arbstr-policy", "x-arbstr-provider", "x-arbstr-fallback"})
"""arbstr's headers that stay on the flow until routing reads (and removes) them."""
_ROUTING_NAMES = frozenset(name.encode() for name in ROUTING_HEADERS)
APP = "arbstr_app"
SIGN_IN = "arbstr_sign_in"
"""Flow metadata: the token of a dashboard ?token= link, taken out of the URL."""
OPEN_PATHS = frozenset({*PUBLIC_ENDPOINTS, *(p for p in dashboard.ASSETS if p != dashboard.PAGE)})
"""Answered without the auth token: health, and the dashboard's files (no data in them)."""
"""flow.metadata key of the app a request is attributed to, found before its headers are stripped."""
SETTLE_WAIT = 2.0
STREAM_COPY_BYTES = 1024 * 1024
"""Seconds the response hook waits for a relayed stream's settlement before letting the flow go."""
LISTEN_OPTIONS = frozenset({"listen_host", "listen_port", "mode"})
HEAD_HEADERS = frozenset(name.encode() for name in APP_HEADERS | {"content-length"})
"""The request headers `requestheaders` reads once the client is let in."""


def wallet_payments(config: Config, wallet: Wallet) -> WalletPayments:
    """The payments of the providers paid from the wallet (`payment = "wallet"` or `"xcashu"`)."""
    from arbstr.payment import WalletPayments
    settings = config.wallet
    paid = [(p.name, p.url, config.payment_of(p)) for p in config.providers if config.payment_of(p) != "key"]
    return WalletPayments(wallet, paid, refund_after=settings.refund_after,
                          key_funding_sats=settings.key_funding_sats, topup_headroom=settings.topup_headroom,
                          xcashu_sats=settings.xcashu_sats)


def config_path(option: str) -> str:
    return option or os.environ.get("ARBSTR_CONFIG") or "config.toml"


class ArbstrAddon:
    def __init__(self, config: Config | None = None, clock: Callable[[], float] = time.time, *,
                 shows_flows: bool = True) -> None:
        self._given_config = config
        self._clock = clock
        """What budget windows are measured by (a test moves it)."""
        self.shows_flows = shows_flows
        """Whether anything shows or saves flows (mitmweb, mitmdump): `arbstr serve` skips dressing them."""
        self.engine: Engine | None = None
        self._dispatcher: Dispatcher | None = None
        self._relay: StreamRelay | None = None
        self._relay_unlogged: RelayOutOfTheLog | None = None
        self._prober: asyncio.Task | None = None
        self._reconciled = False
        self._reconciling: asyncio.Task | None = None
        self._payments: WalletPayments | None = None
        self._payments_task: asyncio.Task | None = None
        self._pricer: asyncio.Task | None = None
        self._budget_keeper: asyncio.Task | None = None
        self._balance_reader: asyncio.Task | None = None
        self._settling: dict[str, StreamSettler] = {}
        """Relayed streams by flow id, until the response hook has their final cost."""
        self.metrics = Metrics()
        self._deadlines = HeadDeadlines()
        self._proxy_auth = TokenProxyAuth()
        """Kept across config reloads, so counters never go back."""
        self.metrics.watch(lambda: self.engine)
        self._refusal: str | None = None
        """Why arbstr will not serve where mitmproxy listens, if it will not."""

    def load(self, loader) -> None:
        loader.add_option("arbstr_config", str, "",
                          "Path of arbstr's config file (default: $ARBSTR_CONFIG, else ./config.toml).")
        loader.add_option("arbstr_log", str, "",
                          "arbstr's own log level: debug, info, warning or error, optionally with logger=level "
                          "pairs such as peewee=debug (default: $ARBSTR_LOG, else info). mitmproxy's flow "
                          "output keeps its own termlog_verbosity.")
        loader.add_option("arbstr_stream_copy", int, STREAM_COPY_BYTES,
                          "Bytes of each streamed answer kept so mitmweb and mitmproxy can show its body after "
                          "it passed (0: none). Only where flows are viewed: mitmdump and arbstr serve keep none.")
        loader.add_option("arbstr_log_format", str, "",
                          "text, or json for one JSON object per line (default: $ARBSTR_LOG_FORMAT, else text).")
        # Requests too malformed to reach a hook (a garbage request line, a non-numeric
        # Content-Length) get mitmproxy's HTML error page; arbstr's clients expect OpenAI JSON.
        _http1.make_error_response = json_error_page

    def configure(self, updated: set[str]) -> None:
        if {"arbstr_log", "arbstr_log_format"} & updated or self.engine is None:
            try:
                configure_logging(ctx.options.arbstr_log or None, ctx.options.arbstr_log_format or None)
            except ValueError as exc:
                raise OptionsError(f"arbstr's log settings: {exc}") from None
        first = self.engine is None
        if self._given_config is not None:
            if first:
                self.use(self._given_config)
        elif "arbstr_config" in updated or first:
            path = config_path(ctx.options.arbstr_config)
            try:
                self.use(load_config(path))
            except ArbstrError as exc:
                raise OptionsError(exc.message) from None
        if first or updated & LISTEN_OPTIONS or "arbstr_config" in updated:
            self._listen_where_configured()
            self._refuse_open_listener()
        self._list_flows_once_shown()

    def _list_flows_once_shown(self) -> None:
        """Where flows are listed, keep arbstr's out of the list until they show where they went
        (see flowview.UntilShown); again after the list's filter was replaced."""
        view = ctx.master.addons.get("view") if self.shows_flows else None
        if view is not None and not isinstance(view.filter, UntilShown):
            view.set_filter(UntilShown(view.filter, self._handles))

    def _listen_where_configured(self) -> None:
        """Under mitmdump/mitmweb, `[server] listen` decides where to listen unless the command line
        did (`--listen-host`, `-p`): mitmproxy's own default is every interface."""
        server = self.engine.config.server
        # mitmproxy has no public way to tell an option left at its default from one given as the
        # default value; only the unset marker does.
        wanted = {name: value for name, value in (("listen_host", server.host), ("listen_port", server.port))
                  if ctx.options._options[name].value is optmanager.unset}
        if not wanted:
            return
        ctx.options.update(**wanted)
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is not None and (len(proxyserver.servers) or proxyserver.servers.is_updating):
            asyncio_utils.create_task(_listen_again(), name="arbstr: listen where configured", keep_ref=True)

    def _refuse_open_listener(self) -> None:
        """Whoever reaches arbstr spends the user's sats: a listener other machines can reach needs
        `[server] auth_token`, under mitmdump and mitmweb as under `arbstr serve`."""
        self._refusal = None
        if self.engine.config.server.requires_token:
            return
        exposed = set()
        for spec in ctx.options.mode:
            mode = ProxyMode.parse(spec)
            if mode.listen_port(ctx.options.listen_port) is not None:
                host = mode.listen_host(ctx.options.listen_host)
                if not is_loopback(host):
                    exposed.add(host or "every interface")
        if exposed:
            self._refusal = (
                f"arbstr will not listen on {', '.join(sorted(exposed))} without [server] auth_token: anyone "
                "who reaches it could spend your sats. Listen on 127.0.0.1 (--listen-host 127.0.0.1, or "
                "[server] listen), or set [server] auth_token (or tokens).")
            raise OptionsError(self._refusal)

    def use(self, config: Config) -> None:
        """Route with this configuration from the next request on (the ledger stays if its database does)."""
        remember(config.secrets())
        self._deadlines.timeout = config.server.client_header_timeout
        self._proxy_auth.use(config.server)
        ledger = self.engine.ledger if self.engine else None
        if ledger is None or ledger.url != config.database.path:
            try:
                new_ledger = Ledger.from_config(config)
            except Exception as exc:
                raise OptionsError(f"cannot open the database {redact_url(config.database.path)!r}: "
                                   f"{redact_url(str(exc))}") from None
            if ledger is not None:
                ledger.close()
            ledger = new_ledger
        wallet = self.engine.wallet if self.engine else None
        if config.wallet is None:
            wallet = None
        elif wallet is None or wallet.ledger is not ledger or wallet.mints != config.wallet.mints:
            from arbstr.wallet import Wallet
            wallet = Wallet(ledger, config.wallet.mints)
            self._reconciled = False
        self.engine = Engine(config, ledger, self.metrics, wallet, self._clock)
        self._payments = wallet_payments(config, wallet) if wallet else None
        self.engine.payability = self._payments.unpayable if self._payments else None
        self._dispatcher = None

    def running(self) -> None:
        if self._refusal:
            # Under mitmdump a script's configure error is only logged: stop here all the same.
            log.error(self._refusal)
            ctx.master.shutdown()
            return
        if self.engine and self.engine.wallet and not self._reconciled:
            self._reconciled = True
            self._reconciling = asyncio.get_running_loop().create_task(self._reconcile(self.engine.wallet))
        if self._payments and self._payments_task is None:
            self._payments_task = asyncio.get_running_loop().create_task(
                self._look_after(self._payments, self._reconciling))
        if self.engine and self.engine.config.routing.health_interval > 0 and self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        if self.engine and self._pricer is None:
            self._pricer = asyncio.get_running_loop().create_task(self._read_prices_forever())
        if self.engine and self._budget_keeper is None:
            self._budget_keeper = asyncio.get_running_loop().create_task(self._look_after_budgets())
        if self.engine and self.engine.wallet and self._balance_reader is None:
            self._balance_reader = asyncio.get_running_loop().create_task(self._read_balances_forever())

    async def _read_prices_forever(self) -> None:
        """Keep the engine's market prices fresh, off the request path (a reload brings a new market)."""
        while True:
            market = self.engine.market
            if market.due():
                try:
                    await market.refresh()
                except Exception:  # a bug here must not stop every later read
                    log.exception("reading provider prices failed")
            await asyncio.sleep(min(1.0, market.config.routing.price_refresh or 1.0))

    async def _look_after_budgets(self) -> None:
        """Say this process is alive, and take back what dead ones left reserved: first at start,
        before the ledger thread takes any new reservation, then every HEARTBEAT_INTERVAL."""
        while True:
            try:
                await self.engine.budgets.look_after()
            except Exception:  # a failing database must not stop every later look
                log.exception("budgets: looking after reservations failed")
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _read_balances_forever(self) -> None:
        """With a wallet, what each key holds at its node, asked off the request path every
        BALANCE_MAX_AGE, for the owner's /health and /metrics (which never ask a node themselves)."""
        while True:
            engine = self.engine
            if engine.wallet is not None:
                try:
                    await refresh_balances(engine)
                except Exception:  # a bug here must not stop every later read
                    log.exception("reading the balances of keys at nodes failed")
            await asyncio.sleep(BALANCE_MAX_AGE)

    async def _reconcile(self, wallet: Wallet) -> None:
        """Finish or undo what a crash left in flight, before the wallet pays anything new; the
        change of an X-Cashu request whose answer was lost is asked of its node again."""
        from arbstr.funding import collect_change, finish_refunds
        urls = {p.name: p.url for p in self.engine.config.providers}

        async def recover(op, token: str) -> int:
            if op.provider not in urls:
                return 0
            return await collect_change(wallet, op.provider, urls[op.provider], token, op.request_id)
        try:
            report = await wallet.reconcile(recover)
            refunded = await finish_refunds(wallet)
        except ArbstrError as exc:
            log.warning("wallet: reconciling at start failed (%s); it is tried again at the next start", exc.message)
            return
        if report.finished or report.reclaimed_sats or report.settled_sats or refunded:
            log.info("wallet: reconciled at start: %d operations finished, %d sats reclaimed, %d sats found paid, "
                     "%d sats of interrupted refunds received", report.finished, report.reclaimed_sats,
                     report.settled_sats, refunded)

    @staticmethod
    async def _look_after(payments: WalletPayments, reconciling: asyncio.Task | None) -> None:
        """Which wallet-paid nodes take the wallet's mint, then the keys earlier runs made and the
        idle-key refunds, off the request path; those only once the start's reconcile is done (it
        settles the tokens the keys came from)."""
        await payments.check_mints()
        if reconciling is not None:
            await asyncio.gather(reconciling, return_exceptions=True)
        await payments.load_keys()
        await payments.refund_idle_forever()

    async def _probe_forever(self) -> None:
        """Probe every provider's /v1/models on an interval, off the request path."""
        while True:
            dispatcher, _ = await self._upstream()
            engine = self.engine
            await asyncio.gather(*(dispatcher.probe(e) for e in engine.endpoints.values()))
            await asyncio.sleep(engine.config.routing.health_interval)

    async def done(self) -> None:
        """Record requests still at a provider as interrupted, finish streams, close connections,
        then write every accepted ledger row."""
        if self.engine:
            self.engine.interrupt_in_flight()
        if self._reconciling:
            await asyncio.gather(self._reconciling, return_exceptions=True)
        for task in (self._prober, self._pricer, self._budget_keeper, self._balance_reader):
            if task:
                task.cancel()
        if self._payments_task:
            self._payments_task.cancel()
        if self._relay:
            await self._relay.stop()
            MITMPROXY_CONNECTIONS.removeFilter(self._relay_unlogged)
        if self._payments:
            # Wallet-funded keys go back into the wallet: nothing is left stranded at a node.
            try:
                async with asyncio.timeout(SHUTDOWN_REFUNDS):
                    refunded = await self._payments.close()
                if refunded:
                    log.info("wallet: %d sats refunded from keys at nodes", refunded)
            except TimeoutError:
                log.warning("wallet: refunding the keys at nodes took over %g s; `arbstr wallet refund` "
                            "finishes it", SHUTDOWN_REFUNDS)
        if self._dispatcher:
            await self._dispatcher.aclose()
        if self.engine and self.engine.ledger:
            self.engine.ledger.close()

    async def _upstream(self) -> tuple[Dispatcher, StreamRelay]:
        assert self.engine is not None
        if self._relay is None:
            self._relay = StreamRelay(self.engine.config.routing.drain_abandoned_streams)
            await self._relay.start()
            self._relay_unlogged = RelayOutOfTheLog(f"127.0.0.1:{self._relay.port}")
            MITMPROXY_CONNECTIONS.addFilter(self._relay_unlogged)
        if self._dispatcher is None:
            engine = self.engine
            config = engine.config
            client = HttpClient(engine.deadlines.connect, connector=connector_for(config.providers, config.routing.proxy))
            self._dispatcher = Dispatcher(engine.endpoints, engine.deadlines, engine.health, client,
                                          payments=self._payments.payments if self._payments else None,
                                          on_model_unknown=engine.model_unknown)
        return self._dispatcher, self._relay

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """In regular (HTTPS_PROXY) mode, TLS to hosts arbstr does not intercept stays undecrypted."""
        if self.engine is None or isinstance(data.context.client.proxy_mode, ReverseMode):
            return
        intercept = self.engine.config.intercept
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if intercept.passthrough and host.lower() not in intercept.hosts:
            data.ignore_connection = True

    def _handles(self, flow: http.HTTPFlow) -> bool:
        """Reverse mode: every request is arbstr's. Other modes: only OpenAI chat and model-list
        requests to an intercepted host; everything else passes through untouched."""
        if self.engine is None:
            return False
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        return (flow.request.pretty_host.lower() in self.engine.config.intercept.hosts
                and _path(flow) in INTERCEPTED_PATHS)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """On top of mitmproxy's own choice: HTTP/2 for prior-knowledge clients, head limits for HTTP/1."""
        if self.engine is not None:
            server = self.engine.config.server
            choose_http_server(nextlayer, server.max_header_count, server.max_header_bytes)

    def client_connected(self, client: connection.Client) -> None:
        self._deadlines.connected(client)

    def client_disconnected(self, client: connection.Client) -> None:
        self._deadlines.disconnected(client)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Regular mode: a CONNECT needs the auth token as proxy credentials, when one is set."""
        self._proxy_auth.http_connect(flow)
        if flow.response is None:
            self._deadlines.tunnel_opened(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse before the body is read: strangers to a regular-mode listener with a token, heads
        over the limits, clients without the token, bodies over the limit."""
        if flow.response or flow.error or not flow.live:
            return
        self._list_flows_once_shown()  # (mitmproxy's console can set a new filter at any time)
        self._deadlines.head_received(flow)
        # Before anything reads or strips the request's headers: they hold its proxy credentials.
        self._proxy_auth.requestheaders(flow)
        if flow.response or not self._handles(flow):
            return
        server = self.engine.config.server
        intercepted = not isinstance(flow.client_conn.proxy_mode, ReverseMode)
        token_name = None
        path = _path(flow)
        try:
            check_head_size(flow.request.headers.fields, server.max_header_count, server.max_header_bytes)
            local_address = (flow.client_conn.sockname or ("",))[0]
            if not server.requires_token and local_address and not is_loopback(local_address):
                # Whatever mitmproxy was told to listen on, without a token arbstr serves this machine only.
                raise Unauthorized("This arbstr serves only its own machine: set [server] auth_token to serve others.")
            # An intercepted client's Authorization holds its key for the real host, not arbstr's token.
            if server.requires_token and not intercepted and not _signing_in(flow, path):
                try:
                    token_name = _authenticate(flow, server, path)
                except Unauthorized:
                    if path not in OPEN_PATHS:
                        raise
                    if path in PUBLIC_ENDPOINTS:
                        flow.metadata[META] = {"stranger": True}
            header = header_lookup(flow.request.headers.fields, HEAD_HEADERS)
            flow.metadata[APP] = app_of(header, token_name or None)
            length = (header("content-length") or "0").strip()
            if not length.isdigit():
                raise InvalidRequest("The Content-Length header is not a number.", code="invalid_content_length")
            if int(length) > server.max_body_bytes:
                raise TooLarge(f"The request body is {length} bytes; this arbstr accepts at most "
                               f"{server.max_body_bytes} (server.max_body_bytes).")
        except ArbstrError as exc:
            flow.metadata[META] = {}
            _answer_error(flow, exc)
            if path == dashboard.PAGE and isinstance(exc, Unauthorized):
                # The sign-in form is a page like any other (a 401 would show as an error in the
                # browser's console); it holds no data.
                flow.response = _page_response(200, dashboard.login_page(), "text/html; charset=utf-8")
            if self.shows_flows:
                _show_answered_here(flow)
        _strip_client_secrets(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self._handles(flow):
            return
        engine = self.engine
        path = _path(flow)
        method = flow.request.method
        meta = flow.metadata.setdefault(META, {})
        try:
            if len(flow.request.raw_content or b"") > engine.config.server.max_body_bytes:
                raise TooLarge(f"The request body is over {engine.config.server.max_body_bytes} bytes "
                               "(server.max_body_bytes).")
            if path in CHAT_PATHS:
                if method != "POST":
                    raise MethodNotAllowed(f"{path} takes POST, not {method}.")
                await self._route(flow, engine)
            elif path == dashboard.PAGE and (method == "POST" or SIGN_IN in flow.metadata):
                _sign_in(flow, engine.config.server)
            elif found := dashboard.asset(path):
                if method != "GET":
                    raise MethodNotAllowed(f"{path} takes GET, not {method}.")
                flow.metadata[META]["local"] = path
                flow.response = _page_response(200, *found)
            elif path in ENDPOINTS or path in PAGES:
                if method != "GET":
                    raise MethodNotAllowed(f"{path} takes GET, not {method}.")
                meta["local"] = path
                flow.comment = f"arbstr: local {path}"
                if path in ENDPOINTS:
                    endpoint = PUBLIC_ENDPOINTS[path] if meta.get("stranger") else ENDPOINTS[path]
                    status, payload = await endpoint(engine, dict(flow.request.query))
                    flow.response = json_response(status, payload)
                else:
                    status, content_type, content = await PAGES[path](engine, dict(flow.request.query))
                    flow.response = http.Response.make(status, content, {"content-type": content_type})
            else:
                raise NotFound(f"arbstr has no endpoint {method} {path}; chat goes to POST /v1/chat/completions.")
        except ArbstrError as exc:
            _answer_error(flow, exc)
        except Exception:
            # A bug must not send the flow on to the reverse-mode placeholder: answer, and log it.
            log.exception("arbstr failed on %s %s", method, path)
            _answer_error(flow, ArbstrError("arbstr hit an internal error; the details are in its log."))
        if self.shows_flows and flow.response is not None and "provider" not in flow.metadata[META]:
            _show_answered_here(flow)

    async def _route(self, flow: http.HTTPFlow, engine: Engine) -> None:
        body = flow.request.raw_content or b""
        meta = flow.metadata[META]
        meta["request_id"] = os.urandom(16).hex()  # 128 random bits, 32 hex digits (uuid4().hex's form, at a fifth of its cost)
        routing = _take_routing_headers(flow)
        pinning = engine.pinning(routing("x-arbstr-provider"), routing("x-arbstr-fallback"))
        decision = engine.decide(meta["request_id"], body, routing("x-arbstr-policy"),
                                 app=flow.metadata.get(APP), pinning=pinning)
        meta.update(policy=decision.policy.name, model=decision.chat.model, app=decision.app)
        budget = engine.budget(decision)
        try:
            await self._send(flow, engine, decision, budget)
        finally:
            budget.release()  # budgets: whatever the request still holds when it ends without settling

    async def _send(self, flow: http.HTTPFlow, engine: Engine, decision: Decision, budget: RequestBudget) -> None:
        meta = flow.metadata[META]
        body = flow.request.raw_content or b""
        request = OutboundRequest(PROVIDER_CHAT_PATH, body, forwarded_headers(flow.request.headers.fields),
                                  decision.chat.model, decision.chat.stream, meta["request_id"])
        dispatcher, relay = await self._upstream()
        engine.sending(decision)
        sent_at = time.time()
        try:
            # budgets: a request no budget applies to has nothing to reserve before each attempt
            answer = await dispatcher.send(decision.plan, request, lambda: client_gone(flow),
                                           lambda provider: engine.sending(decision, provider),
                                           budget if budget.budgets else None)
        except (AllProvidersFailed, ClientGone, CannotPay) as exc:
            if isinstance(exc, AllProvidersFailed):
                exc.explain(decision.plan)
            meta["attempts"] = summarize_attempts(exc.attempts)
            # budgets: when every candidate was skipped for its provider's cap, the client reads the cap
            capped = budget.refused if all(a.outcome == "budget" for a in exc.attempts) else None
            error = capped or exc
            engine.settle(decision, Outcome(None, error.status, None, None, time.monotonic(), error=error.code,
                                            attempts=meta["attempts"], failures=failures_of(exc.attempts),
                                            paid_elsewhere_msats=paid_by_failures(exc.attempts)))
            _answer_error(flow, error)
            views = attempt_views(exc.attempts, sent_at)
            meta["tries"] = [view.to_metadata() for view in views]
            flow.comment = route_comment(RouteSummary(decision.chat.model, None, views, error=error.code))
            _show_failed_attempts(flow, views, body, meta["request_id"], decision.chat.model)
            return
        except BudgetExceeded as exc:
            engine.settle(decision, Outcome(None, exc.status, None, None, time.monotonic(), error=exc.code))
            raise
        exchange, attempts = answer.exchange, [*answer.attempts, exchange_attempt(answer.exchange)]
        meta.update(provider=exchange.provider, attempts=summarize_attempts(answer.attempts))
        route = None
        if self.shows_flows:
            route = self._dress_route(flow, decision, answer.attempts, attempts, sent_at, body)
        stamp = _arbstr_headers(meta)
        meta["stamped"] = True
        if answer.streamed:
            settler = StreamSettler(engine, decision, exchange, meta["attempts"], failures_of(attempts), flow, route,
                                    budget.take(), _stream_copy(), paid_by_failures(answer.attempts))
            self._settling[flow.id] = settler
            self._hand_stream_to_mitmproxy(flow, relay, exchange, settler, stamp)
            return
        if self.shows_flows:
            _show_exchange(flow, exchange)
        raw = exchange.body
        flow.response, usage = _whole_response(exchange, raw, stamp)
        reported = exchange.header(COST_HEADER)
        state = exchange.attempt.state
        gone = client_gone(flow)
        record = engine.settle(decision, Outcome(
            exchange.provider, exchange.status, usage,
            cost_msats_from_headers([(COST_HEADER, reported)]) if reported else None,
            time.monotonic(), attempts=meta["attempts"], failures=failures_of(attempts), client_gone=gone,
            error=CLIENT_GONE_ERROR if gone else None if state is EndState.OK
            else f"provider answered {exchange.status}", paid_msats=exchange.paid_msats,
            paid_elsewhere_msats=paid_by_failures(answer.attempts)))
        budget.settle(record.cost_sats)  # budgets: the reservation becomes what the request cost
        _note_cost(flow, record, route)

    @staticmethod
    def _dress_route(flow: http.HTTPFlow, decision: Decision, failed: list[Attempt], attempts: list[Attempt],
                     sent_at: float, body: bytes) -> RouteSummary:
        """What views show of a routed flow before its cost is known: the estimate, each attempt,
        the comment, the failover mark and the failed attempts' own flows. Only where flows are
        shown or saved: `arbstr serve` has nothing that would read it."""
        meta = flow.metadata[META]
        chosen = decision.plan.candidate(meta["provider"])
        views = attempt_views(attempts, sent_at)
        meta.update(estimated_sats=exact_sats(chosen.estimated_cost), tries=[view.to_metadata() for view in views])
        route = RouteSummary(decision.chat.model, meta["provider"], views, estimated_sats=chosen.estimated_cost)
        flow.comment = route_comment(route)
        if failed:
            flow.marked = FAILOVER_MARK
        _show_failed_attempts(flow, views, body, meta["request_id"], decision.chat.model)
        return route

    @staticmethod
    def _hand_stream_to_mitmproxy(flow: http.HTTPFlow, relay: StreamRelay, exchange: Exchange,
                                  settler: StreamSettler, stamp: list[tuple[bytes, bytes]]) -> None:
        """Point the flow at the relay; the URL shown in mitmweb stays the provider's (Host header kept)."""
        ticket = relay.register(exchange, settler, stamp)
        flow.request.data.scheme = b"http"
        flow.request.data.host = "127.0.0.1"
        flow.request.data.port = relay.port
        flow.request.headers[StreamRelay.TICKET_HEADER] = ticket
        flow.metadata[META]["relayed"] = True

    async def response(self, flow: http.HTTPFlow) -> None:
        """A relayed stream is settled when the relay sees its end, a moment before or after
        mitmproxy does: wait for it so mitmweb shows the flow with its actual cost."""
        self._deadlines.answered(flow)
        settler = self._settling.pop(flow.id, None)
        if settler is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settler.settled.wait(), SETTLE_WAIT)
            if self.shows_flows:
                _show_exchange(flow, settler.exchange)
            if settler.copy is not None:
                # mitmproxy keeps nothing of a streamed body: show the copy the relay kept as it passed
                flow.response.raw_content = settler.copy.getvalue()
                flow.metadata[META]["body_copy_truncated"] = settler.copy.truncated
        self._show_ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._deadlines.answered(flow)
        settler = self._settling.pop(flow.id, None)
        if settler is not None and self.shows_flows:
            _show_exchange(flow, settler.exchange)
        self._show_ended(flow)

    def _show_ended(self, flow: http.HTTPFlow) -> None:
        """A flow of arbstr's that ended before it was rewritten (a refusal, a client gone while
        routing) is listed all the same, with the address its client used."""
        if self.shows_flows and SHOWN not in flow.metadata and self._handles(flow):
            _show_answered_here(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or flow.response is None:
            return
        if meta.get("relayed"):
            flow.response.stream = True
            settler = self._settling.get(flow.id)
            if settler is not None and self.shows_flows:
                # mitmproxy has reached the relay: from here on, show what the provider got and who it is
                _show_exchange(flow, settler.exchange)
            flow.request.headers.pop(StreamRelay.TICKET_HEADER, None)
        if not meta.get("stamped") and "request_id" in meta:
            flow.response.headers["x-arbstr-request-id"] = meta["request_id"]


def _token_name(server: ServerConfig, sent: str) -> str:
    """The name of the client token sent ("" for auth_token); Unauthorized when it is none of them.
    Every configured token is compared, in constant time each, so timing does not tell which matched."""
    known = ([("", server.auth_token)] if server.auth_token is not None else []) + [(t.name, t.token) for t in server.tokens]
    matched = None
    for name, token in known:
        if hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            matched = name
    if matched is None:
        raise Unauthorized("This arbstr needs its auth token: send it as 'Authorization: Bearer <token>'.")
    return matched


CLIENT_GONE_ERROR = "client_disconnected: the client went away before the answer ended"


def client_gone(flow: http.HTTPFlow) -> bool:
    """Whether the client has closed its connection (mitmproxy stops reading it then)."""
    return ConnectionState.CAN_READ not in flow.client_conn.state  # (`state & CAN_READ` makes a new Flag: 5x the cost)


def forwarded_headers(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The client headers a provider may see, as the bytes the client sent; one that cannot be
    written as it is (a CR or LF in it) is dropped. One pass over the headers, however many."""
    return tuple((name, value) for name, value in fields
                 if name.lower() in FORWARDED_REQUEST_HEADERS and http1.valid_field(name, value))


def exchange_attempt(exchange: Exchange) -> Attempt:
    """The answering exchange's attempt; a stream's is still open, so it is described as answering."""
    return exchange.attempt or Attempt(exchange.provider, EndState.OK, exchange.status, url=exchange.url,
                                       sent_headers=exchange.sent_headers)


async def _listen_again() -> None:
    """Move mitmproxy's servers to where the options now say.

    A script is loaded while mitmproxy starts its servers (on its defaults), and mitmproxy does not
    move a running server when listen_host or listen_port change: wait until they are up, then
    start them again. (Waiting on mitmproxy's own lock here stalled now and then: it is polled.)"""
    proxyserver = ctx.master.addons.get("proxyserver")
    for _ in range(600):
        if proxyserver.is_running and not proxyserver.servers.is_updating:
            break
        await asyncio.sleep(0.05)
    await proxyserver.servers.update([])
    await proxyserver.setup_servers()


def _strip_client_secrets(flow: http.HTTPFlow) -> None:
    """The client's credentials and arbstr's own headers leave the flow before anything can show it.
    One pass over the fields (a `Headers.pop` each walks them all again)."""
    fields = flow.request.headers.fields
    kept = tuple(field for field in fields if not _client_only(field[0]))
    if len(kept) != len(fields):
        flow.request.headers.fields = kept


def _client_only(name: bytes) -> bool:
    lowered = name.decode("utf-8", "surrogateescape").lower()
    return lowered in CLIENT_ONLY_HEADERS or lowered.startswith("x-arbstr-") and lowered not in ROUTING_HEADERS


def _take_routing_headers(flow: http.HTTPFlow) -> Callable[[str], str | None]:
    """The routing headers' values, read (as `Headers.pop` reads them) and taken out of the flow in
    one pass: most requests carry none of them."""
    fields = flow.request.headers.fields
    routing = header_lookup(fields, _ROUTING_NAMES)
    if any(routing(name) is not None for name in ROUTING_HEADERS):
        flow.request.headers.fields = tuple(field for field in fields if field[0].lower() not in _ROUTING_NAMES)
    return routing


def header_lookup(fields: tuple[tuple[bytes, bytes], ...], names: frozenset[bytes]) -> Callable[[str], str | None]:
    """`Headers.get` for a few (lower-case) names, from one pass over the fields (each `Headers.get`
    walks all of them): names compared as mitmproxy compares them, repeats folded with ", " as it folds them."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        lowered = name.lower()
        if lowered in names:
            found.setdefault(lowered, []).append(value)

    def get(name: str) -> str | None:
        values = found.get(name.encode("utf-8", "surrogateescape").lower())
        return None if values is None else ", ".join(v.decode("utf-8", "surrogateescape") for v in values)
    return get


def _path(flow: http.HTTPFlow) -> str:
    return flow.request.path.split("?", 1)[0].rstrip("/") or "/"


def _authenticate(flow: http.HTTPFlow, server: ServerConfig, path: str) -> str:
    """The name of the client token a request carries ("" for auth_token); Unauthorized without one.
    A browser's dashboard session counts for GET requests to arbstr's own read-only endpoints."""
    scheme, _, sent = flow.request.headers.get("authorization", "").strip().partition(" ")
    if not scheme and flow.request.method == "GET" and path not in CHAT_PATHS:
        session = dashboard.session_token_name(server, flow.request.headers.get("cookie", ""))
        if session is not None:
            return session
    # The scheme in any case (RFC 9110); a bare token is refused, as a real API would refuse it.
    if scheme.lower() != "bearer":
        raise Unauthorized("This arbstr needs its auth token: send it as 'Authorization: Bearer <token>'.")
    return _token_name(server, sent.strip())


def _signing_in(flow: http.HTTPFlow, path: str) -> bool:
    """The dashboard's sign-in (a posted form, or a ?token= link): the token is checked by `_sign_in`.
    A link's token leaves the flow here, so nothing shows it; the form's body leaves it once read."""
    if path != dashboard.PAGE:
        return False
    if flow.request.method == "GET" and "token" in flow.request.query:
        flow.metadata[SIGN_IN] = flow.request.query["token"]
        del flow.request.query["token"]
        return True
    return flow.request.method == "POST"


def _sign_in(flow: http.HTTPFlow, server: ServerConfig) -> None:
    """Check the token once; a good one gets the session cookie and goes on to the dashboard."""
    token = flow.metadata.pop(SIGN_IN, None)
    if token is None:
        token = urllib.parse.parse_qs((flow.request.raw_content or b"").decode("utf-8", "replace")).get("token", [""])[0]
        flow.request.content = b""
    flow.metadata[META]["local"] = dashboard.PAGE
    try:
        if server.requires_token:
            _token_name(server, token)
    except Unauthorized:
        flow.response = _page_response(401, dashboard.login_page("That is not this arbstr's token."),
                                       "text/html; charset=utf-8")
        return
    flow.response = http.Response.make(303, b"", {"location": dashboard.PAGE, "cache-control": "no-store"})
    if server.requires_token:
        flow.response.headers["set-cookie"] = dashboard.session_cookie(token)


def _page_response(status: int, content: bytes, content_type: str) -> http.Response:
    return http.Response.make(status, content, {"content-type": content_type, **dashboard.SECURITY_HEADERS})


def _answer_error(flow: http.HTTPFlow, exc: ArbstrError) -> None:
    flow.metadata[META]["error"] = exc.code
    flow.comment = f"arbstr: {exc.code}: {exc.message}"
    flow.marked = ERROR_MARK
    flow.response = json_response(exc.status, exc.to_payload())


def _show_answered_here(flow: http.HTTPFlow) -> None:
    """In reverse mode the request's address is mitmproxy's placeholder target: show the client's instead."""
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        show_local(flow)
    shown(flow)


def _show_exchange(flow: http.HTTPFlow, exchange: Exchange) -> None:
    """The request as the provider received it, and the provider as the flow's server."""
    show_sent(flow, exchange.url, exchange.sent_headers)
    show_server(flow, exchange.url, flow.request.timestamp_start, time.time())
    shown(flow)


def _show_failed_attempts(flow: http.HTTPFlow, views: list[AttemptView], body: bytes, request_id: str,
                          model: str) -> None:
    """Each failed attempt as a marked flow of its own, where flows are viewed (mitmweb, mitmproxy)."""
    view = ctx.master.addons.get("view")
    if view is None:
        return
    failed = [attempt_flow(flow, attempt, body, attempt_comment(attempt, number, request_id, model))
              for number, attempt in enumerate(views, 1) if attempt.failed and attempt.url]
    if failed:
        view.add(failed)


def _stream_copy() -> BoundedCopy | None:
    """A bounded copy of a stream for the views to show; none where nothing views flows."""
    limit = ctx.options.arbstr_stream_copy
    return BoundedCopy(limit) if limit > 0 and ctx.master.addons.get("view") is not None else None


def attempt_views(attempts: list[Attempt], started: float) -> list[AttemptView]:
    """The exchange's attempts as flows show them (SKIPPED ones were never sent: no URL). They
    are timed as the whole plan was: from the first attempt's start to now."""
    now = time.time()
    return [AttemptView(a.provider, a.url, a.state.value, a.status, a.detail, a.sent_headers, started, now)
            for a in attempts]


def json_error_page(status_code: int, message: str = "") -> bytes:
    """mitmproxy's own protocol errors, as OpenAI-shaped JSON."""
    return http1.closing_error(ArbstrError(message or http.status_codes.RESPONSES.get(status_code, "error"),
                                           status=status_code, code="bad_http",
                                           type="invalid_request_error" if status_code < 500 else "proxy_error"))


def json_response(status: int, payload: dict[str, Any]) -> http.Response:
    return http.Response.make(status, json.dumps(payload).encode(), {"content-type": "application/json"})


class StreamSettler(StreamTap):
    """Watches a relayed stream for usage and cost, and settles the request when it ends."""

    def __init__(self, engine: Engine, decision: Decision, exchange: Exchange, attempts: str,
                 failures: tuple[tuple[str, str], ...], flow: http.HTTPFlow, route: RouteSummary | None,
                 budget: RequestBudget, copy: BoundedCopy | None = None, paid_elsewhere_msats: int = 0) -> None:
        self.engine, self.decision, self.exchange, self.attempts, self.flow = engine, decision, exchange, attempts, flow
        self.paid_elsewhere_msats = paid_elsewhere_msats
        self.route, self.copy = route, copy
        self.failures = failures
        self.budget = budget
        self.observer = StreamUsageObserver()
        self.decode = stream_decoder(exchange.header("content-encoding") or "")
        self.first_byte: float | None = None
        self.settled = asyncio.Event()

    def feed(self, chunk: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self.observer.feed(self.decode(chunk) if self.decode else chunk)
        if self.copy is not None:
            self.copy.feed(chunk)

    def complete(self) -> bool:
        return self.observer.finish().complete

    def finish(self, exchange: Exchange) -> None:
        usage = self.observer.finish()
        attempt = exchange.attempt
        if attempt.state is EndState.OK:
            error = None
        elif attempt.state is EndState.CLIENT_GONE:
            error = CLIENT_GONE_ERROR
        else:
            error = f"{attempt.state.value}: {attempt.detail}"
        record = self.engine.settle(self.decision, Outcome(
            exchange.provider, exchange.status, usage, None, time.monotonic(), self.first_byte,
            error=error, attempts=self.attempts, failures=self.failures,
            client_gone=attempt.state is EndState.CLIENT_GONE, paid_msats=exchange.paid_msats,
            paid_elsewhere_msats=self.paid_elsewhere_msats))
        self.budget.settle(record.cost_sats)  # budgets: the reservation becomes what the stream cost
        _note_cost(self.flow, record, self.route)
        self.settled.set()


def _note_cost(flow: http.HTTPFlow, record: RequestRecord, route: RouteSummary | None) -> None:
    """Put the settled cost where mitmweb shows it: the comment, and in full in the flow's metadata.
    No route summary: nothing shows the flow (`arbstr serve`), so there is nothing to note."""
    if route is None:
        return
    meta = flow.metadata[META]
    if record.cost_sats is not None:
        meta["cost_sats"] = exact_sats(record.cost_sats)
        if record.next_best_cost_sats is not None:
            meta["next_best_sats"] = exact_sats(record.next_best_cost_sats)
            meta["saved_sats"] = exact_sats(record.next_best_cost_sats - record.cost_sats)
    if record.error:
        meta["error"] = record.error
        flow.marked = ERROR_MARK
    flow.comment = route_comment(dataclasses.replace(route, cost_sats=record.cost_sats,
                                                     next_best_sats=record.next_best_cost_sats, error=record.error))


def _arbstr_headers(meta: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The x-arbstr-* headers of a routed response."""
    return [(b"x-arbstr-request-id", meta["request_id"].encode()),
            (b"x-arbstr-provider", meta["provider"].encode()),
            (b"x-arbstr-policy", meta["policy"].encode()),
            (b"x-arbstr-attempts", meta["attempts"].encode("latin-1", "replace"))]


def _whole_response(exchange: Exchange, raw: bytes,
                    stamp: list[tuple[bytes, bytes]]) -> tuple[http.Response, UsageReport | None]:
    """The provider's answer as the flow's response, byte for byte (with `arbstr_provider` in a
    plain JSON object), and the usage it reports, read through any content encoding."""
    content_type = (exchange.header("content-type") or "").lower()
    coding = (exchange.header("content-encoding") or "").strip().lower()
    usage = None
    if "json" in content_type:
        try:
            usage = usage_from_json(encoding.decode(raw, coding) if coding and coding != "identity" else raw)
        except ValueError:
            usage = None
    if not coding and 200 <= exchange.status < 300 and raw[:1] == b"{" and "json" in content_type:
        raw = _add_provider_field(raw, exchange.provider)
    elif not coding and exchange.status >= 400:
        raw = redact_bytes(raw)  # an error text may quote the key the provider was paid with
    headers = [*exchange.headers, *stamp, (b"content-length", str(len(raw)).encode())]
    now = time.time()
    response = http.Response(b"HTTP/1.1", exchange.status, exchange.reason.encode("latin-1", "replace"),
                             tuple(headers), raw, None, now, now)
    return response, usage


def stream_decoder(coding: str) -> Callable[[bytes], bytes] | None:
    """Decodes a content-encoded stream piece by piece, for reading its usage (the client still gets
    the provider's bytes); None for identity. An undecodable piece reads as nothing."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip", "deflate"):
        step = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress  # a gzip or zlib header, detected
    elif coding == "br":
        step = brotli.Decompressor().process
    else:
        return lambda chunk: b""

    def decode(chunk: bytes) -> bytes:
        try:
            return step(chunk)
        except Exception:  # zlib.error, brotli.error: a corrupt stream tells no usage
            return b""
    return decode


def _add_provider_field(raw: bytes, provider: str) -> bytes:
    """Insert `"arbstr_provider"` as the object's first key without re-encoding the provider's JSON."""
    rest = raw[1:].lstrip()
    separator = b"" if rest.startswith(b"}") else b", "
    return b'{"arbstr_provider": ' + json.dumps(provider).encode() + separator + rest
