"""What arbstr knows about each provider's health: circuit breakers, funds, last error and success.

Pure bookkeeping with an injectable clock, so every transition is unit-tested without waiting.
Breakers are kept per provider (connection failures: the node is down for every model) and per
provider+model (a node whose upstream for one model fails). A 402 is not a failure: the
provider wants more money, so it is set aside as out of funds for a while, reported apart.
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
    probe_started: float | None = None
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
        self.clock = clock
        self.wall_clock = wall_clock

    def unavailable(self, model: str, providers: Iterable[str]) -> dict[str, str]:
        """Which of `providers` should not get `model` now, with why. A breaker whose cooldown is
        over lets exactly one trial request through (half-open) and keeps the others away meanwhile."""
        now = self.clock()
        reasons = {}
        for name in providers:
            health = self.providers[name]
            if health.out_of_funds_until is not None:
                if now < health.out_of_funds_until:
                    reasons[name] = f"out of funds ({health.funds_detail})"
                    continue
                health.out_of_funds_until = None
            for breaker, scope in ((health.breaker, "provider"), (health.models.get(model), model)):
                if breaker is not None and not self._admits(breaker, now):
                    reasons[name] = f"circuit open for {scope} after {breaker.consecutive_failures} failures" \
                        f" (last: {health.last_error})"
                    break
        return reasons

    def _admits(self, breaker: Breaker, now: float) -> bool:
        if breaker.state == CLOSED:
            return True
        probe_running = breaker.probe_started is not None and now - breaker.probe_started < self.probe_timeout
        if breaker.state == HALF_OPEN or now - breaker.opened_at >= self.cooldown:
            if probe_running:
                return False
            breaker.state = HALF_OPEN
            breaker.probe_started = now
            return True
        return False

    def record_success(self, provider: str, model: str | None = None) -> None:
        health = self.providers[provider]
        health.last_success_at = self.wall_clock()
        health.out_of_funds_until = None
        for breaker in (health.breaker, health.models.get(model) if model else None):
            if breaker is not None:
                breaker.state, breaker.consecutive_failures, breaker.probe_started = CLOSED, 0, None

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
            breaker.state, breaker.opened_at, breaker.probe_started = OPEN, self.clock(), None

    def record_out_of_funds(self, provider: str, detail: str) -> None:
        health = self.providers[provider]
        health.out_of_funds_until = self.clock() + self.funds_cooldown
        health.funds_detail = detail
        health.last_error, health.last_error_at = f"out of funds: {detail}", self.wall_clock()

    def state(self, provider: str) -> str:
        """`up`, `out_of_funds`, `open`, `half_open`, `degraded` (a model's breaker is open) or `unknown`."""
        health = self.providers[provider]
        if health.out_of_funds_until is not None and self.clock() < health.out_of_funds_until:
            return "out_of_funds"
        if health.breaker.state != CLOSED:
            return health.breaker.state
        if any(b.state != CLOSED for b in health.models.values()):
            return "degraded"
        if health.last_success_at is None and health.last_error_at is None:
            return "unknown"
        return "up"
