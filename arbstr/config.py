"""Configuration: TOML in (tomlkit), one immutable pydantic `Config` out.

Every problem is reported at once, each named by its key and, for providers and rules, by the
name of the entry it concerns, so `arbstr check` can list them all.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import tomlkit
import tomlkit.exceptions
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from arbstr.errors import ConfigError
from arbstr.pricing import Rates

DEFAULT_RELAYS = ("wss://relay.routstr.com", "wss://relay.damus.io", "wss://nos.lol")
DEFAULT_DIRECTORY = "https://api.routstr.com/v1/providers/"

STRATEGIES = {"cheapest": "cheapest", "lowest_cost": "cheapest"}
"""Strategy names a user may write, mapped to the strategy the router implements."""

DEFAULT_LISTEN = "127.0.0.1:8080"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def _exact(value: Any) -> Any:
    """Read a TOML number as the Decimal the user wrote (3.03 stays 3.03, not 3.0300000000000002)."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int):
        return Decimal(value)
    return value


Sats = Annotated[Decimal, BeforeValidator(_exact), Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerToken(_Model):
    """One client's own token: requests that send it are attributed to `name` when nothing more specific names the app."""

    name: str
    token: SecretStr

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return ProviderConfig._check_name(value)


class ServerConfig(_Model):
    listen: str = DEFAULT_LISTEN
    auth_token: SecretStr | None = None
    """When set, clients must send `Authorization: Bearer <auth_token>`."""
    tokens: list[ServerToken] = Field(default_factory=list)
    """Named client tokens, accepted like auth_token; the name attributes a request to an app."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024
    """Largest request body accepted; larger ones get a 413."""
    max_header_count: Annotated[int, Field(ge=16)] = 256
    """Most request headers accepted; more get a 431."""
    max_header_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024
    """Most bytes of request headers accepted; more get a 431."""
    client_header_timeout: Annotated[float, Field(ge=0)] = 30.0
    """Seconds a client connection has to deliver a request head, from its start or its previous
    answer; then it is closed (slowloris). 0 turns it off."""
    instance_id: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    """Written on every ledger row; instances sharing one database need different ones."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _unique_tokens(self) -> ServerConfig:
        _reject_duplicates([t.name for t in self.tokens], "server.tokens", "token")
        values = [t.token.get_secret_value() for t in self.tokens]
        if len(set(values)) != len(values):
            raise ValueError("server.tokens: two tokens have the same value, so a request could not say which it is")
        return self

    @property
    def requires_token(self) -> bool:
        return self.auth_token is not None or bool(self.tokens)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def instance(self) -> str:
        """instance_id, else this machine's name and the listening port (unique on a shared database)."""
        return self.instance_id or f"{socket.gethostname()}:{self.port}"


class DatabaseConfig(_Model):
    path: str = "arbstr.db"
    flush_interval: Annotated[float, Field(ge=0, le=60)] = 0.05
    """Seconds the ledger writer waits to gather rows into one transaction (they are flushed on exit);
    0 commits each batch as soon as it arrives."""
    buffer_rows: Annotated[int, Field(ge=1)] = 50_000
    """Rows kept in memory while the database cannot be written, retried until it can."""
    spill_path: str | None = None
    """File that takes the rows beyond buffer_rows while the database fails (best on another disk)."""
    reload_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Seconds between reloads of the learned ratios that other instances on the same database update."""


class RoutingConfig(_Model):
    default_reply_tokens: Annotated[int, Field(gt=0, le=1_000_000)] = 256
    """Reply length in tokens assumed until anything is learned: replies vary far less in length
    than their inputs do, so this beats any fixed output/input ratio."""
    default_output_ratio: Annotated[float, Field(gt=0, le=1000)] | None = None
    """Output tokens per input token assumed until learned, instead of default_reply_tokens (set it
    when your replies really do grow with their inputs)."""
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    """Seconds to open a connection to a provider before trying the next one."""
    header_timeout: Annotated[float, Field(gt=0)] = 60.0
    """Seconds to wait for a provider's response headers before trying the next one."""
    body_timeout: Annotated[float, Field(gt=0)] = 120.0
    """Seconds a whole non-streamed body may take after its headers; past it, the next provider is tried."""
    stream_idle_timeout: Annotated[float, Field(gt=0)] = 120.0
    """Seconds a stream may go without a chunk before arbstr ends it as stalled."""
    max_response_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest non-streamed answer arbstr takes from a provider; a larger one fails over."""
    drain_abandoned_streams: bool = True
    """When a client leaves mid-stream, read the provider's stream to its end anyway (within
    stream_idle_timeout) to record its usage: a Routstr node bills the whole answer regardless."""
    failure_threshold: Annotated[int, Field(ge=1)] = 3
    """Consecutive failures that open a provider's circuit breaker (a refused connection opens it at once)."""
    cooldown: Annotated[float, Field(gt=0)] = 30.0
    """Seconds an open breaker keeps a provider out of rotation before one trial request."""
    funds_cooldown: Annotated[float, Field(gt=0)] = 300.0
    """Seconds a provider that answered 402 (out of funds) stays out of rotation."""
    health_interval: Annotated[float, Field(ge=0)] = 30.0
    """Seconds between background probes of each provider's /v1/models; 0 turns probing off."""
    price_refresh: Annotated[float, Field(ge=0)] = 300.0
    """Seconds between reads of each provider's live prices (its /v1/models); 0 reads them once, at start."""
    max_price_jump: Annotated[float, Field(gt=1)] = 10.0
    """A live price that moves by more than this factor between reads is held back, not adopted."""
    risk_aversion: Annotated[float, Field(ge=0, le=10)] = 0.05
    """Sats of ranking score per sat of cost uncertainty: on near ties, prefer the provider whose
    cost depends least on how long the reply turns out to be (0: rank on expected cost alone)."""
    failure_penalty: Sats = Decimal(0)
    """Sats a failed attempt is worth avoiding beyond any charge (the wait before the next provider)."""
    rank_by_success_rate: bool = True
    """Rank by expected sats per successful answer, from each provider's recent success rate; false
    ranks on price alone (failover and breakers still apply), so a failing provider stays first."""
    overcharge_threshold: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Share of a provider's recent checked charges above its advertised prices that makes it an overcharger."""
    overcharge_action: Literal["demote", "exclude", "none"] = "demote"
    """What happens to an overcharger: tried after every other provider, not tried, or only reported."""
    proxy: str | None = None
    """How providers are reached unless a provider names its own: `socks5h://127.0.0.1:9050` (Tor)."""

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        return None if value is None else check_proxy_url(value)


class InterceptConfig(_Model):
    """Regular (HTTPS_PROXY) mode: which hosts' OpenAI chat traffic arbstr takes over."""

    hosts: list[str] = Field(default_factory=lambda: ["api.openai.com"])
    passthrough: bool = True
    """Leave TLS to every other host undecrypted: arbstr never sees that traffic."""

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        cleaned = [h.strip().lower() for h in value]
        if any(not h or "/" in h or ":" in h for h in cleaned):
            raise ValueError("holds something that is not a bare host name (write api.openai.com, no scheme or port)")
        return cleaned


class WalletConfig(_Model):
    """The Cashu wallet arbstr pays providers from (its proofs live in the [database])."""

    mints: list[str]
    """Mints whose ecash the wallet holds and accepts; the first one is where it mints and pays from."""
    refund_after: Annotated[float, Field(gt=0)] = 600.0
    """Seconds a wallet-funded key at a node may sit idle before its balance is refunded to the wallet."""
    key_funding_sats: Annotated[int, Field(ge=1)] = 500
    """Sats put on a node key the first time a `payment = "wallet"` provider is used, and the least a
    top-up adds."""
    topup_headroom: Annotated[Decimal, BeforeValidator(_exact), Field(ge=1, le=100)] = Decimal(2)
    """A top-up after a 402 adds what the node said it lacked times this (so the next requests fit too)."""
    xcashu_sats: Annotated[int, Field(ge=1)] = 50
    """Sats sent with the first X-Cashu request of a model to a node; a 402 teaches arbstr the node's
    real reservation for it (the change comes back, so paying more than the cost loses nothing)."""

    @field_validator("mints")
    @classmethod
    def _check_mints(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("lists no mint: name the mint your ecash comes from")
        cleaned = [m.strip().rstrip("/") for m in value]
        for mint in cleaned:
            scheme, sep, rest = mint.partition("://")
            if not sep or scheme not in ("http", "https") or not rest:
                raise ValueError(f"'{mint}' is not an http(s) URL such as https://mint.example")
        _reject_duplicates(cleaned, "wallet.mints", "mint")
        return cleaned


class ModelPrice(_Model):
    """One model in a provider's table; every figure left out is the provider's own."""

    input_rate: Sats | None = None
    output_rate: Sats | None = None
    base_fee: Sats | None = None
    max_cost: Sats | None = None
    """The most one request may cost (what the provider reserves), in sats."""
    context_length: Annotated[int, Field(ge=1)] | None = None


class ProviderConfig(_Model):
    name: str
    url: str
    api_key: SecretStr | None = None
    payment: Literal["key", "wallet", "xcashu"] | None = None
    """How this provider is paid: `key` (api_key, funded by you), `wallet` (a key at the node that
    arbstr funds from [wallet] and refunds), `xcashu` (a wallet token with every request). Default:
    `key` when api_key is set, else `wallet` when there is a [wallet]."""
    pricing: Literal["live", "config"] = "live"
    """`live`: models and prices come from the provider's /v1/models, these figures are the fallback
    while it cannot be read. `config`: these figures are the prices, whatever the provider says."""
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    """Written as a list of names (every one at the provider's rates) or as
    `[providers.models."NAME"]` tables that may set their own figures."""
    input_rate: Sats | None = None
    """Sats per 1000 input (prompt) tokens."""
    output_rate: Annotated[Sats | None, Field(validate_default=True)] = None
    """Sats per 1000 output (completion) tokens."""
    base_fee: Sats = Decimal(0)
    """Flat sats per request that you know this provider bills."""
    ca_file: str | None = None
    """PEM bundle of the CA(s) that sign this provider's HTTPS certificate, instead of the system's."""
    verify: bool = True
    """false: do not check this provider's certificate at all (`arbstr check` warns)."""
    proxy: str | None = None
    """Reach this provider through this proxy (e.g. `socks5h://127.0.0.1:9050` for a .onion node)."""

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"'{value}' is not a file (a PEM bundle of CA certificates)")
        return None if value is None else str(Path(value).expanduser())

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        return None if value is None else check_proxy_url(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return normalize_base_url(value)

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_table(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(not isinstance(m, str) for m in value):
                raise ValueError("holds something that is not a model name")
            return {m: {} for m in value}
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: dict[str, ModelPrice], info: ValidationInfo) -> dict[str, ModelPrice]:
        if any(not m.strip() for m in value):
            raise ValueError("holds an empty model name")
        if not value and info.data.get("pricing") == "config":
            raise ValueError('lists no model, and pricing = "config": name at least one model this provider serves')
        return value

    @field_validator("output_rate")
    @classmethod
    def _rates_in_pairs(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        if "input_rate" in info.data and (value is None) != (info.data["input_rate"] is None):
            raise ValueError("is required with input_rate" if value is None else "is set but input_rate is not: set both")
        return value

    @model_validator(mode="after")
    def _check_prices(self) -> ProviderConfig:
        unpriced = [m for m in self.models if self.configured_rates(m) is None]
        if self.pricing == "config" and unpriced:
            raise ValueError(f"pricing = \"config\" but {', '.join(unpriced)} has no input_rate and output_rate: "
                             "set them on the provider or in [providers.models.\"NAME\"]")
        return self

    def configured_rates(self, model: str) -> Rates | None:
        """The config's price for one model, per-model figures over the provider's; None when unpriced."""
        own = self.models.get(model) or ModelPrice()
        input_rate = self.input_rate if own.input_rate is None else own.input_rate
        output_rate = self.output_rate if own.output_rate is None else own.output_rate
        if input_rate is None or output_rate is None:
            return None
        return Rates(input_rate, output_rate, self.base_fee if own.base_fee is None else own.base_fee)

    @property
    def priced_models(self) -> list[str]:
        """The configured models that have a configured price."""
        return [m for m in self.models if self.configured_rates(m) is not None]


class PolicyRule(_Model):
    name: str
    allowed_models: list[str] | None = None
    strategy: str | None = None
    max_sats_per_1k_output: Sats | None = None
    max_sats_per_request: Sats | None = None
    keywords: list[str] = Field(default_factory=list)
    providers: list[str] | None = None
    """Only these providers may serve requests under this rule."""
    allow_fallback: bool = True
    """False: only the first candidate is tried, and its failure goes back to the client as is."""
    max_price_ratio: Annotated[Decimal, BeforeValidator(_exact), Field(ge=1, allow_inf_nan=False)] | None = None
    """Never use a provider whose estimate is more than this many times the cheapest candidate's."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value == "default":
            raise ValueError("'default' is reserved for the policy used when no rule applies")
        return ProviderConfig._check_name(value)

    @field_validator("allowed_models", "providers")
    @classmethod
    def _check_not_empty(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and not value:
            kind = "model" if info.field_name == "allowed_models" else "provider"
            raise ValueError(f"is empty, so the rule would allow no {kind}: remove the key to allow every {kind}")
        return value

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_strategy(value)

    @field_validator("keywords")
    @classmethod
    def _check_keywords(cls, value: list[str]) -> list[str]:
        if any(not k.strip() for k in value):
            raise ValueError("holds an empty keyword")
        return value


class PoliciesConfig(_Model):
    default_strategy: str = "cheapest"
    rules: list[PolicyRule] = Field(default_factory=list)

    @field_validator("default_strategy")
    @classmethod
    def _check_strategy(cls, value: str) -> str:
        return check_strategy(value)

    @model_validator(mode="after")
    def _unique_names(self) -> PoliciesConfig:
        _reject_duplicates([r.name for r in self.rules], "policies.rules", "rule")
        return self


BUDGET_WINDOWS = ("day", "week", "month", "1h", "24h")
BUDGET_SCOPES = ("policy", "model", "provider", "app")
"""What a budget may be limited to (one of them, or none for all traffic)."""


def _thresholds(value: list[int]) -> list[int]:
    if not value or any(not 0 < t <= 1000 for t in value):
        raise ValueError("must list percentages of the limit between 1 and 1000, such as [50, 80, 100]")
    return sorted(set(value))


Thresholds = Annotated[list[int], AfterValidator(_thresholds)]


class BudgetConfig(_Model):
    name: str
    limit_sats: Sats
    window: str
    """`day`, `week`, `month` (calendar, UTC) or rolling `1h`, `24h`."""
    policy: str | None = None
    model: str | None = None
    provider: str | None = None
    app: str | None = None
    alerts: Thresholds | None = None
    """Percentages of the limit whose crossing is alerted; default [budget_alerts] thresholds."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return ProviderConfig._check_name(value)

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str) -> str:
        if value not in BUDGET_WINDOWS:
            raise ValueError(f"unknown window '{value}'; known: {', '.join(BUDGET_WINDOWS)}")
        return value

    @model_validator(mode="after")
    def _one_scope(self) -> BudgetConfig:
        if len([s for s in BUDGET_SCOPES if getattr(self, s) is not None]) > 1:
            raise ValueError(f"budget '{self.name}' sets more than one of {', '.join(BUDGET_SCOPES)}: "
                             "a budget counts all traffic or the traffic of one of them")
        return self

    @property
    def scope(self) -> tuple[str, str | None]:
        """(`all`, None) or the scope and the name it matches."""
        return next(((s, getattr(self, s)) for s in BUDGET_SCOPES if getattr(self, s) is not None), ("all", None))


class BudgetAlertsConfig(_Model):
    thresholds: Thresholds = Field(default_factory=lambda: [50, 80, 100])
    webhook: str | None = None
    """A URL each alert is POSTed to as JSON."""

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value.strip()):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return None if value is None else value.strip()


class DiscoveryConfig(_Model):
    """Where `arbstr discover` looks for providers."""

    relays: list[str] = Field(default_factory=lambda: list(DEFAULT_RELAYS))
    """Nostr relays (ws:// or wss://) asked for kind-38421 provider announcements."""
    directory: str | None = DEFAULT_DIRECTORY
    """A Routstr provider directory (`GET` answers `{"providers": [...]}`); empty to skip it."""

    @field_validator("relays")
    @classmethod
    def _check_relays(cls, value: list[str]) -> list[str]:
        for relay in value:
            if not relay.startswith(("ws://", "wss://")):
                raise ValueError(f"'{relay}' is not a ws:// or wss:// relay URL")
        return value

    @field_validator("directory")
    @classmethod
    def _check_directory(cls, value: str | None) -> str | None:
        if value is not None and value.strip() and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value.strip() or None if value is not None else None


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    intercept: InterceptConfig = Field(default_factory=InterceptConfig)
    wallet: WalletConfig | None = None
    providers: list[ProviderConfig]
    policies: PoliciesConfig = Field(default_factory=PoliciesConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    budget_alerts: BudgetAlertsConfig = Field(default_factory=BudgetAlertsConfig)

    @model_validator(mode="after")
    def _budget_targets(self) -> Config:
        _reject_duplicates([b.name for b in self.budgets], "budgets", "budget")
        known = {"provider": {p.name for p in self.providers},
                 "policy": {r.name for r in self.policies.rules} | {"default"}}
        for budget in self.budgets:
            scope, match = budget.scope
            if scope in known and match not in known[scope]:
                raise ValueError(f"budgets[{budget.name}].{scope}: no {scope} is named '{match}'; "
                                 f"known: {', '.join(sorted(known[scope]))}")
        return self

    @model_validator(mode="after")
    def _unique_providers(self) -> Config:
        _reject_duplicates([p.name for p in self.providers], "providers", "provider")
        for provider in self.providers:
            payment = self.payment_of(provider)
            if payment != "key" and self.wallet is None:
                raise ValueError(f"providers[{provider.name}].payment: '{payment}' pays from the wallet, "
                                 "and there is no [wallet] section")
        known = {p.name for p in self.providers}
        for rule in self.policies.rules:
            unknown = [name for name in rule.providers or () if name not in known]
            if unknown:
                raise ValueError(f"policies.rules[{rule.name}].providers: no provider is named "
                                 f"{', '.join(repr(n) for n in unknown)}; known: {', '.join(sorted(known))}")
        return self

    def payment_of(self, provider: ProviderConfig) -> str:
        """`key`, `wallet` or `xcashu`: the provider's own setting, else its key, else the wallet."""
        if provider.payment is not None:
            return provider.payment
        return "key" if provider.api_key is not None or self.wallet is None else "wallet"

    def secrets(self) -> list[str]:
        """Every secret value in the configuration: provider keys and Cashu tokens, the client tokens."""
        found = [p.api_key for p in self.providers if p.api_key] + [t.token for t in self.server.tokens]
        if self.server.auth_token is not None:
            found.append(self.server.auth_token)
        return [s.get_secret_value() for s in found]

    def warnings(self) -> list[str]:
        """Things that work but are probably not what the user meant, or that put money at risk."""
        offered = {m for p in self.providers for m in p.models}
        # A live provider may serve any model, so only a config that names every model can tell.
        complete = all(p.pricing == "config" for p in self.providers)
        notes = []
        if not is_loopback(self.server.host) and not self.server.requires_token:
            notes.append(f"server.listen: {self.server.listen} is reachable from other machines and "
                         "server.auth_token is not set: anyone who reaches it spends your sats")
        for budget in self.budgets:
            if complete and budget.model is not None and budget.model not in offered:
                notes.append(f"budgets[{budget.name}].model: no provider offers '{budget.model}', so it counts nothing")
        for rule in self.policies.rules:
            for model in rule.allowed_models or []:
                if complete and model not in offered:
                    notes.append(f"policies.rules[{rule.name}].allowed_models: no provider offers '{model}'")
        for p in self.providers:
            if p.pricing == "live" and not p.priced_models:
                notes.append(f"providers[{p.name}]: prices only from its /v1/models (no configured rates to fall "
                             "back on): it is not routed to while that cannot be read")
        for provider in self.providers:
            if not provider.verify and provider.url.startswith("https://"):
                notes.append(f"providers[{provider.name}].verify = false: arbstr does NOT check this provider's "
                             "TLS certificate, so anyone on the path can impersonate it, read its answers and "
                             "take the key or Cashu token it is paid with; give it a ca_file instead")
        return notes


PROXY_SCHEMES = ("socks5h", "socks5", "socks4", "http")


def check_proxy_url(url: str) -> str:
    """`socks5h://host:port` and its kin (user:password@ allowed); ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in PROXY_SCHEMES:
        raise ValueError(f"'{parts.scheme}' is not a proxy scheme arbstr speaks: use "
                         f"{', '.join(s + '://' for s in PROXY_SCHEMES)} (socks5h for Tor)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError("must name a host and a port, e.g. socks5h://127.0.0.1:9050")
    return url


def check_strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"unknown strategy '{value}'; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[value]


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a listener on `host` (`""` means every interface).
    Cached: every request asks it of the address its client reached, always one of a few."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8080`; port 0 picks a free one) into its parts; ValueError when it is not one."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"'{value}' is not host:port (for example {DEFAULT_LISTEN})")
    return host, int(port)


def normalize_base_url(url: str) -> str:
    """A provider's OpenAI base URL, always ending in `/v1` and without a trailing slash."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError(f"'{url}' is not an http(s) URL such as https://provider.example/v1")
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def _reject_duplicates(names: list[str], where: str, what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{where}: two {what}s are named '{name}'; names must be unique")
        seen.add(name)


def file_warnings(path: str | Path, text: str) -> list[str]:
    """Warnings about secrets written in the config file itself."""
    try:
        raw = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError:
        return []
    literal = []
    for index, provider in enumerate(raw.get("providers") or []):
        key = provider.get("api_key") if isinstance(provider, dict) else None
        if _is_literal(key):
            literal.append(f"providers[{provider.get('name', index)}].api_key")
    server = raw.get("server")
    if isinstance(server, dict) and _is_literal(server.get("auth_token")):
        literal.append("server.auth_token")
    for index, token in enumerate(server.get("tokens") or [] if isinstance(server, dict) else []):
        if isinstance(token, dict) and _is_literal(token.get("token")):
            literal.append(f"server.tokens[{token.get('name', index)}].token")
    notes = [f"{where} is written in the file: prefer \"${{VAR}}\" so the secret stays out of it" for where in literal]
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return notes
    if literal and mode & 0o077:
        notes.insert(0, f"{path} holds secrets and other users can read it (mode {mode & 0o777:o}): "
                        f"run chmod 600 {path}")
    return notes


def _is_literal(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and not _ENV_REF.match(value.strip())


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; ConfigError lists every problem."""
    return parse_config(_read_text(Path(path)), str(path), environ)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found (copy config.example.toml to {path} and edit it)"], str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read it: {exc}"], str(path))


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source)


def load_table[T: BaseModel](path: str | Path, name: str, model: type[T]) -> T:
    """One table of the config alone (`[database]` for `stats`, `[discovery]` for `discover`): commands
    that need nothing else run without provider keys set."""
    raw = _parse_toml(_read_text(Path(path)), str(path)).get(name, {})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(err, {name: raw}, (name,)) for err in exc.errors()], str(path))


def parse_config(text: str, source: str = "config", environ: Mapping[str, str] | None = None,
                 require_keys: bool = True) -> Config:
    """A validated config; `require_keys=False` checks everything but whether provider keys are set."""
    environ = os.environ if environ is None else environ
    raw = _parse_toml(text, source)
    problems = _resolve_keys(raw, environ) if require_keys else []
    database_url = environ.get("DATABASE_URL")
    if database_url:
        raw.setdefault("database", {})
        if isinstance(raw["database"], dict):
            raw["database"]["path"] = database_url
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, raw) for err in exc.errors()]
        raise ConfigError(problems, source)
    if problems:
        raise ConfigError(problems, source)
    return config


def _resolve_keys(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Replace each provider's api_key by its value: literal, `${VAR}`, or ARBSTR_<NAME>_API_KEY;
    and each named client token written as `${VAR}` by the variable's value."""
    problems: list[str] = []
    providers = raw.get("providers")
    for index, provider in enumerate(providers if isinstance(providers, list) else []):
        if not isinstance(provider, dict):
            continue
        label = f"providers[{provider.get('name', index)}].api_key"
        if provider.get("api_key") is None:
            var = provider_key_variable(str(provider.get("name", "")))
            if environ.get(var):
                provider["api_key"] = environ[var]
            elif provider.get("payment") == "key" or (provider.get("payment") not in ("wallet", "xcashu")
                                                       and not isinstance(raw.get("wallet"), dict)):
                problems.append(f"{label}: not set; set api_key or export {var}")
        else:
            _resolve_reference(provider, "api_key", label, environ, problems)
    server = raw.get("server")
    tokens = server.get("tokens") if isinstance(server, dict) else None
    for index, token in enumerate(tokens if isinstance(tokens, list) else []):
        if isinstance(token, dict):
            _resolve_reference(token, "token", f"server.tokens[{token.get('name', index)}].token", environ, problems)
    return problems


def _resolve_reference(entry: dict[str, Any], key: str, label: str, environ: Mapping[str, str],
                       problems: list[str]) -> None:
    """A secret written as `${VAR}` becomes the variable's value; an empty or unset one is a problem."""
    value = entry.get(key)
    if isinstance(value, str) and (match := _ENV_REF.match(value.strip())):
        var = match.group(1)
        if environ.get(var):
            entry[key] = environ[var]
        else:
            problems.append(f"{label}: environment variable {var} is not set")
    elif isinstance(value, str) and not value.strip():
        problems.append(f"{label}: is empty")


def provider_key_variable(name: str) -> str:
    return "ARBSTR_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_API_KEY"


def _describe(error: Any, raw: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """A pydantic error as `providers[alpha].input_rate: must be >= 0`."""
    parts: list[str] = []
    node: Any = raw
    for item in prefix + tuple(error["loc"]):
        if isinstance(item, int):
            entry = node[item] if isinstance(node, list) and item < len(node) else None
            label = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else item
            parts[-1:] = [f"{parts[-1]}[{label}]"] if parts else [f"[{label}]"]
            node = entry
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    where = ".".join(parts) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown key (check its spelling against config.example.toml)"
    elif kind == "missing":
        message = "is required"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def mask_secret(secret: SecretStr | str | None) -> str:
    """A key or token as people may see it: its kind and last four characters, never the rest."""
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    if not value:
        return ""
    if len(value) < 16:
        return "****"
    kind = "cashu" if value.startswith("cashu") else value[:3]
    return f"{kind}…{value[-4:]}"
