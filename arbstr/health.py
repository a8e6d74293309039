"""What arbstr knows about each provider's health: circuit breakers, funds, its key, last error and success.

Pure bookkeeping with an injectable clock, so every transition is unit-tested without waiting.
Breakers are kept per provider (connection failures: the node is down for every model) and per
provider+model (a node whose upstream for one model fails). A 402 is not a failure: the
provider wants more money, so it is set aside as out of funds for `funds_cooldown`, reported
apart; a 401/403 (it refuses arbstr's key) likewise, as `auth_failed`. Neither ends early because
a probe succeeds: an unfunded node still lists its models.

`unavailable()` is a query without side effects; the one trial request of a half-open breaker is
claimed with `claim()` when that request is about to be sent, and given back by whatever ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(slots=True)
class Breaker:
    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_started: float | None = None
    """When the one trial request of a half-open breaker went out."""


@dataclass(slots=True)
class ProviderHealth:
    breaker: Breaker = field(default_factory=Breaker)
    models: dict[str, Breaker] = field(default_factory=dict)
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    out_of_funds_until: float | None = None
    funds_detail: str | None = None
    auth_failed_until: float | None = None
    auth_detail: str | None = None


class HealthBook:
    """Breaker states and history for every provider; the router reads `unavailable()`."""

    def __init__(self, providers: Iterable[str], failure_threshold: int, cooldown: float, funds_cooldown: float,
                 probe_timeout: float, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.providers = {name: ProviderHealth() for name in providers}
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.funds_cooldown = funds_cooldown
        self.probe_timeout = probe_timeout
        """Seconds after which a trial request that never reported back frees its slot."""
        self.clock = clock
        self.wall_clock = wall_clock

    def unavailable(self, model: str, providers: Iterable[str]) -> dict[str, str]:
        """Which of `providers` should not get `model` now, with why. Changes nothing."""
        now = self.clock()
        reasons = {}
        for name in providers:
            health = self.providers[name]
            if health.auth_failed_until is not None and now < health.auth_failed_until:
                reasons[name] = f"refuses arbstr's key ({health.auth_detail})"
                continue
            if health.out_of_funds_until is not None and now < health.out_of_funds_until:
                reasons[name] = f"out of funds ({health.funds_detail})"
                continue
            for breaker, scope in ((health.breaker, "provider"), (health.models.get(model), model)):
                if breaker is not None and breaker.state != CLOSED and not self._admits(breaker, now):
                    reasons[name] = f"circuit open for {scope} after {breaker.consecutive_failures} failures" \
                        f" (last: {health.last_error})"
                    break
        return reasons

    def _trial_running(self, breaker: Breaker, now: float) -> bool:
        return breaker.trial_started is not None and now - breaker.trial_started < self.probe_timeout

    def _admits(self, breaker: Breaker, now: float) -> bool:
        if breaker.state == CLOSED:
            return True
        if breaker.state == OPEN and now - breaker.opened_at < self.cooldown:
            return False
        return not self._trial_running(breaker, now)

    def claim(self, provider: str, model: str) -> bool:
        """A request is about to be sent to `provider` for `model`: a breaker whose cooldown is over
        lets it through as its one trial (half-open). False when a trial is already in flight or the
        breaker is still cooling down; a closed breaker always admits."""
        health = self.providers[provider]
        breaker, for_model = health.breaker, health.models.get(model)
        if (breaker is None or breaker.state == CLOSED) and (for_model is None or for_model.state == CLOSED):
            return True  # every request to a healthy provider: nothing to admit or mark
        now = self.clock()
        breakers = [b for b in (breaker, for_model) if b is not None and b.state != CLOSED]
        if not all(self._admits(b, now) for b in breakers):
            return False
        for breaker in breakers:
            breaker.state, breaker.trial_started = HALF_OPEN, now
        return True

    def release(self, provider: str, model: str | None) -> None:
        """A claimed request ended without telling anything about the provider (the client left)."""
        health = self.providers[provider]
        for breaker in (health.breaker, health.models.get(model) if model else None):
            if breaker is not None:
                breaker.trial_started = None

    def record_success(self, provider: str, model: str | None = None) -> None:
        """A real answer: closes its breakers, and ends out-of-funds and refused-key early (paid for and
        accepted, so both were fixed)."""
        health = self.providers[provider]
        health.last_success_at = self.wall_clock()
        health.out_of_funds_until = health.auth_failed_until = None
        for breaker in (health.breaker, health.models.get(model) if model else None):
            if breaker is not None:
                breaker.state, breaker.consecutive_failures, breaker.trial_started = CLOSED, 0, None

    def record_probe_success(self, provider: str) -> None:
        """The node answered its model list: it is reachable. That closes a connection breaker, and
        nothing else (an unfunded node, or one refusing arbstr's key, lists its models too)."""
        health = self.providers[provider]
        health.last_success_at = self.wall_clock()
        breaker = health.breaker
        breaker.state, breaker.consecutive_failures, breaker.trial_started = CLOSED, 0, None

    def record_failure(self, provider: str, model: str | None, detail: str, *, connection: bool = False,
                       open_now: bool = False) -> None:
        """A failed attempt. `connection` failures count against the whole provider; `open_now`
        (a refused connection) opens the breaker at once instead of after the threshold."""
        health = self.providers[provider]
        health.last_error, health.last_error_at = detail, self.wall_clock()
        if connection or model is None:
            breaker = health.breaker
        else:
            breaker = health.models.setdefault(model, Breaker())
        breaker.consecutive_failures += 1
        if open_now or breaker.state == HALF_OPEN or breaker.consecutive_failures >= self.failure_threshold:
            breaker.state, breaker.opened_at = OPEN, self.clock()
        self.release(provider, model)

    def record_funded(self, provider: str) -> None:
        """Money was added where the provider wanted it (a wallet top-up, a bigger X-Cashu token next
        time): it is back in rotation at once instead of after funds_cooldown."""
        self.providers[provider].out_of_funds_until = None

    def record_out_of_funds(self, provider: str, detail: str) -> None:
        health = self._set_aside(provider, f"out of funds: {detail}")
        health.out_of_funds_until, health.funds_detail = self.clock() + self.funds_cooldown, detail

    def record_auth_failed(self, provider: str, detail: str) -> None:
        """The provider refused arbstr's key (401/403): set aside like out of funds, for as long."""
        health = self._set_aside(provider, f"refused arbstr's key: {detail}")
        health.auth_failed_until, health.auth_detail = self.clock() + self.funds_cooldown, detail

    def _set_aside(self, provider: str, error: str) -> ProviderHealth:
        health = self.providers[provider]
        health.last_error, health.last_error_at = error, self.wall_clock()
        self.release(provider, None)
        return health

    def state(self, provider: str) -> str:
        """`up`, `auth_failed`, `out_of_funds`, `open`, `half_open`, `degraded` (a model's breaker is
        open) or `unknown`."""
        health = self.providers[provider]
        now = self.clock()
        if health.auth_failed_until is not None and now < health.auth_failed_until:
            return "auth_failed"
        if health.out_of_funds_until is not None and now < health.out_of_funds_until:
            return "out_of_funds"
        if health.breaker.state != CLOSED:
            return HALF_OPEN if self._admits(health.breaker, now) else health.breaker.state
        if any(b.state != CLOSED for b in health.models.values()):
            return "degraded"
        if health.last_success_at is None and health.last_error_at is None:
            return "unknown"
        return "up"
