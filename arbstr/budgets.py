"""Spending caps: budgets over calendar or rolling windows, enforced with reservations in the database.

A request reserves its worst-case cost against every budget that applies to it before it is sent,
and settles to what it actually cost when it ends (a failure releases it). The reservation is one
transaction that sums what each budget has spent and reserved in its window and inserts the new
entries only when every budget has room: under a write lock on SQLite (`BEGIN IMMEDIATE`) and
under advisory locks on PostgreSQL, so concurrent requests, and several instances sharing one
PostgreSQL, never both take the last room. Entries live in the ledger's database (they survive a
restart) and all database work runs on the ledger's thread, never on the event loop. Spend is
kept as running totals per budget and time bucket, so a reservation reads a few rows however
many requests its window holds.

Each reservation names its owner, the arbstr process that made it; every owner notes that it is
alive every HEARTBEAT_INTERVAL seconds. What a dead owner left reserved (killed mid-request: no
settlement will come) is reclaimed by the next process that looks: at once when it ran on the same
machine (its pid is gone), else once its heartbeat is OWNER_TIMEOUT old.

The first half of this module is pure (windows, scopes, worst cases, alert levels); the second
runs on the ledger thread; `BudgetKeeper` and `RequestBudget` tie them to the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import peewee

from arbstr.config import Config
from arbstr.errors import ArbstrError
from arbstr.httpclient import HttpClient, HttpError
from arbstr.pricing import advertised_charge_msats, estimate_cost, exact_sats, format_sats, msats_to_sats
from arbstr.router import Candidate, RoutePlan
from arbstr.stats import iso_time
from arbstr.store import Ledger, from_nsats, to_nsats

log = logging.getLogger("arbstr.budgets")

ROLLING_WINDOWS = {"1h": 3600.0, "24h": 86400.0}
ROLLING_BUCKETS = {"1h": 60.0, "24h": 900.0}
"""Seconds of spend a rolling window's running totals are kept in (see `_bucket`)."""
DEFAULT_THRESHOLDS = (50, 80, 100)
HEARTBEAT_INTERVAL = 10.0
"""Seconds between two notes of a process that it is alive (and looks for dead owners' reservations)."""
OWNER_TIMEOUT = 60.0
"""Seconds without a heartbeat after which an owner on another machine counts as dead."""


class BudgetExceeded(ArbstrError):
    """A request would take a budget past its limit (429, as OpenAI answers a spent quota)."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    limit: Decimal
    """Sats the window may spend."""
    window: str
    scope: str = "all"
    match: str | None = None
    """The policy, model, provider or app the budget is for; None for all traffic."""
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    """Percentages of the limit whose crossing is alerted."""

    def applies(self, policy: str, model: str, app: str | None, provider: str | None = None) -> bool:
        """Whether the budget counts a request with these facts (`provider`: the candidate)."""
        return self.scope == "all" or {"policy": policy, "model": model, "app": app,
                                       "provider": provider}[self.scope] == self.match

    def describe(self) -> str:
        return f"'{self.name}'" + ("" if self.scope == "all" else f" ({self.scope} {self.match})")


@dataclass(frozen=True, slots=True)
class Period:
    """The stretch of time a budget counts now."""

    start: float
    resets_at: float | None
    """When a calendar window starts over; None for a rolling one (spend ages out entry by entry)."""


def current_period(window: str, now: float) -> Period:
    """Calendar windows start at midnight UTC (weeks on Monday, months on the 1st); rolling ones look back."""
    if window in ROLLING_WINDOWS:
        return Period(now - ROLLING_WINDOWS[window], None)
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        start, end = day, day + timedelta(days=1)
    elif window == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    return Period(start.timestamp(), end.timestamp())


def worst_case_cost(candidate: Candidate, plan: RoutePlan, max_output_tokens: int | None,
                    prompt_token_bound: int | None = None) -> Decimal:
    """What a request may cost at most at this candidate. With both of its sizes bounded (the client's
    max_tokens, and a prompt of text only), the most the provider may bill for them at its advertised
    prices, if that is below the offer's max_cost: a node lists max_cost for a full context window,
    tens of sats on a large model, which would let a small cap admit nothing. Else the offer's
    max_cost where the provider states one, else its rates at the client's max_tokens, else the
    estimate (no bound is known)."""
    offer = candidate.offer
    if max_output_tokens is not None and prompt_token_bound is not None:
        bounded = msats_to_sats(advertised_charge_msats(offer.rates, prompt_token_bound, max_output_tokens,
                                                        offer.advertised_fee))
        return bounded if offer.max_cost is None else min(offer.max_cost, bounded)
    if offer.max_cost is not None:
        return offer.max_cost
    if max_output_tokens is not None:
        return max(candidate.estimated_cost, estimate_cost(candidate.offer.rates, plan.input_tokens, max_output_tokens))
    return candidate.estimated_cost


def expected_cost(candidate: Candidate, worst: Decimal) -> Decimal:
    """What the request will most likely cost there (the router's estimate, never above the worst
    case): what a reservation counts as spent when its owner died before it could settle."""
    return min(candidate.estimated_cost, worst)


def alert_level(thresholds: Sequence[int], spent: Decimal, limit: Decimal) -> int:
    """The highest threshold (percent) that `spent` has reached; 0 for none."""
    percent = spent * 100 / limit if limit > 0 else Decimal(100)
    return max((t for t in thresholds if percent >= t), default=0)


@dataclass(frozen=True, slots=True)
class Usage:
    """A budget's standing now."""

    budget: Budget
    spent: Decimal
    reserved: Decimal
    resets_at: float | None

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.budget.limit - self.spent - self.reserved)

    def to_payload(self) -> dict[str, Any]:
        budget = self.budget
        level = alert_level(budget.thresholds, self.spent, budget.limit)
        return {"name": budget.name, "scope": budget.scope, "match": budget.match, "window": budget.window,
                "limit_sats": exact_sats(budget.limit), "spent_sats": exact_sats(self.spent),
                "reserved_sats": exact_sats(self.reserved), "remaining_sats": exact_sats(self.remaining),
                "resets_at": iso_time(self.resets_at),
                "alerts": [t for t in budget.thresholds if t <= level]}


@dataclass(frozen=True, slots=True)
class Alert:
    """A budget crossed a threshold."""

    usage: Usage
    threshold: int

    def describe(self) -> str:
        u = self.usage
        return (f"budget {u.budget.describe()} crossed {self.threshold}%: {format_sats(u.spent)} of "
                f"{format_sats(u.budget.limit)} sats spent this {u.budget.window}")

    def to_payload(self) -> dict[str, Any]:
        return {"event": "budget_threshold", "threshold": self.threshold, **self.usage.to_payload()}


def refusal(usage: Usage, amount: Decimal) -> BudgetExceeded:
    budget = usage.budget
    resets = iso_time(usage.resets_at)
    return BudgetExceeded(
        f"Budget {budget.describe()} would be exceeded: limit {format_sats(budget.limit)} sats per {budget.window}, "
        f"{format_sats(usage.spent)} spent and {format_sats(usage.reserved)} reserved, this request may cost up to "
        f"{format_sats(amount)}; " + (f"the window resets at {resets}." if resets else "spend ages out of the window"),
        details={"budget": budget.name, "limit_sats": exact_sats(budget.limit), "spent_sats": exact_sats(usage.spent),
                 "reserved_sats": exact_sats(usage.reserved), "requested_sats": exact_sats(amount),
                 "resets_at": resets})


# On the ledger thread. -----------------------------------------------------------------------------


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key per budget for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.blake2b(b"arbstr-budget:" + name.encode(), digest_size=8).digest(), "big",
                          signed=True)


@contextlib.contextmanager
def _locked(db: peewee.Database, names: Iterable[str]) -> Iterator[None]:
    """A transaction that holds every named budget until it ends, against other instances too."""
    if isinstance(db, peewee.SqliteDatabase):
        with db.atomic("IMMEDIATE"):  # the database's write lock, taken at BEGIN
            yield
        return
    with db.atomic():
        for key in sorted({_lock_key(n) for n in names}):  # one order everywhere: no deadlock
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (key,))
        yield


def _bucket(budget: Budget, now: float) -> tuple[float, float]:
    """(the bucket `now` falls in, the earliest bucket the budget counts now).

    Spend is kept as running totals per budget and bucket, so a reservation sums a few rows,
    never every request of the window: a calendar window is one bucket; a rolling one is made of
    ROLLING_BUCKETS-second buckets, and counts every bucket that overlaps it (so spend is counted
    up to one bucket longer than the window, never shorter)."""
    if budget.window in ROLLING_WINDOWS:
        size = ROLLING_BUCKETS[budget.window]
        window_start = now - ROLLING_WINDOWS[budget.window]
        return now - now % size, window_start - window_start % size
    start = current_period(budget.window, now).start
    return start, start


def _standing(db: peewee.Database, budget: Budget, now: float) -> Usage:
    _, earliest = _bucket(budget, now)
    p = db.param
    spent, reserved, oldest = db.execute_sql(
        f"SELECT SUM(spent_nsats), SUM(reserved_nsats), MIN(bucket) FROM budget_totals "
        f"WHERE budget = {p} AND bucket >= {p}",
        (budget.name, earliest)).fetchone()
    resets_at = current_period(budget.window, now).resets_at
    if resets_at is None and oldest is not None:
        resets_at = oldest + ROLLING_BUCKETS[budget.window] + ROLLING_WINDOWS[budget.window]
    return Usage(budget, from_nsats(spent or 0), from_nsats(reserved or 0), resets_at)


def reserve(db: peewee.Database, reservation: str, claims: Sequence[tuple[Budget, Decimal]],
            now: float, owner: str = "", expected: Decimal | None = None) -> Usage | None:
    """Reserve each (budget, amount) at once, or none: the standing of the first budget without room, else None.
    `owner` is the process that will settle it; `expected`, what the request will most likely cost."""
    p = db.param
    with _locked(db, [b.name for b, _ in claims]):
        for budget, amount in claims:
            usage = _standing(db, budget, now)
            if usage.spent + usage.reserved + amount > budget.limit:
                return usage
        for budget, amount in claims:
            bucket, _ = _bucket(budget, now)
            nanosats = to_nsats(amount)
            db.execute_sql(f"INSERT INTO budget_totals (budget, bucket, spent_nsats, reserved_nsats) "
                           f"VALUES ({p}, {p}, 0, {p}) ON CONFLICT (budget, bucket) DO UPDATE SET "
                           "reserved_nsats = budget_totals.reserved_nsats + excluded.reserved_nsats",
                           (budget.name, bucket, nanosats))
            likely = nanosats if expected is None else min(nanosats, to_nsats(expected))
            db.execute_sql(f"INSERT INTO budget_reservations (reservation, budget, bucket, amount_nsats, owner, "
                           f"expected_nsats) VALUES ({p}, {p}, {p}, {p}, {p}, {p})",
                           (reservation, budget.name, bucket, nanosats, owner, likely))
    return None


def settle(db: peewee.Database, reservation: str, cost: Decimal | None, budgets: Sequence[Budget],
           now: float) -> list[Alert]:
    """Turn a reservation into what the request cost (None or 0 releases it); the thresholds crossed."""
    p = db.param
    spent = to_nsats(cost or Decimal(0))
    with _locked(db, [b.name for b in budgets]):
        held = db.execute_sql(f"SELECT budget, bucket, amount_nsats FROM budget_reservations WHERE reservation = {p}",
                              (reservation,)).fetchall()
        for budget, bucket, amount in held:
            _move(db, budget, bucket, amount, spent)
        db.execute_sql(f"DELETE FROM budget_reservations WHERE reservation = {p}", (reservation,))
        touched = {row[0] for row in held}
        if not held and spent:
            # Reclaimed meanwhile as its owner's (this process stalled past OWNER_TIMEOUT): what it
            # really cost still counts, in the window it ends in.
            for budget in budgets:
                _add_spent(db, budget.name, _bucket(budget, now)[0], spent)
            touched = {b.name for b in budgets}
        return [alert for b in budgets if spent and b.name in touched for alert in _crossings(db, b, now)]


def _move(db: peewee.Database, budget: str, bucket: float, reserved: int, spent: int) -> None:
    """Take `reserved` nanosats off a bucket's reservations and count `spent` as spent."""
    p = db.param
    db.execute_sql(f"UPDATE budget_totals SET reserved_nsats = reserved_nsats - {p}, "
                   f"spent_nsats = spent_nsats + {p} WHERE budget = {p} AND bucket = {p}",
                   (reserved, spent, budget, bucket))


def _add_spent(db: peewee.Database, budget: str, bucket: float, spent: int) -> None:
    p = db.param
    db.execute_sql(f"INSERT INTO budget_totals (budget, bucket, spent_nsats, reserved_nsats) "
                   f"VALUES ({p}, {p}, {p}, 0) ON CONFLICT (budget, bucket) DO UPDATE SET "
                   "spent_nsats = budget_totals.spent_nsats + excluded.spent_nsats", (budget, bucket, spent))


def _crossings(db: peewee.Database, budget: Budget, now: float) -> list[Alert]:
    """Thresholds the budget has newly reached; a level that fell (a new window, spend aged out)
    is lowered, so the next crossing is alerted again, once."""
    usage = _standing(db, budget, now)
    level = alert_level(budget.thresholds, usage.spent, budget.limit)
    period = current_period(budget.window, now).resets_at or 0.0
    p = db.param
    row = db.execute_sql(f"SELECT level, period FROM budget_alert_levels WHERE budget = {p}", (budget.name,)).fetchone()
    before = row[0] if row is not None and row[1] == period else 0
    if row is None:
        db.execute_sql(f"INSERT INTO budget_alert_levels (budget, level, period) VALUES ({p}, {p}, {p})",
                       (budget.name, level, period))
    elif tuple(row) != (level, period):
        db.execute_sql(f"UPDATE budget_alert_levels SET level = {p}, period = {p} WHERE budget = {p}",
                       (level, period, budget.name))
    return [Alert(usage, t) for t in budget.thresholds if before < t <= level]


def standings(db: peewee.Database, budgets: Sequence[Budget], now: float) -> list[Usage]:
    return [_standing(db, b, now) for b in budgets]


def host_key() -> str:
    """What a pid means something within: this machine's name, its boot and its pid namespace
    (Linux; containers on one kernel each have their own), else the name alone."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclass(frozen=True, slots=True)
class Owner:
    """The arbstr process that holds reservations: a restart is a new owner."""

    token: str
    host: str
    pid: int

    @classmethod
    def this_process(cls) -> Owner:
        host, pid = host_key(), os.getpid()
        return cls(f"{pid}-{uuid.uuid4().hex}", host, pid)


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What a dead owner had reserved, taken back."""

    owner: str
    requests: int
    reserved: Decimal
    """Sats, summed over every budget the requests counted toward (as `counted`)."""
    counted: Decimal


def heartbeat(db: peewee.Database, owner: Owner, at: float) -> None:
    p = db.param
    db.execute_sql(f"INSERT INTO budget_owners (owner, host, pid, heartbeat_at) VALUES ({p}, {p}, {p}, {p}) "
                   "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                   (owner.token, owner.host, owner.pid, at))


def reclaim(db: peewee.Database, me: Owner, at: float,
            alive: Callable[[int], bool] = pid_alive) -> list[Reclaimed]:
    """Take back what dead owners reserved: each reservation counts as spent what its request was
    expected to cost (a node bills a request whose client vanished in full, and no one can ask
    it now), and the rest of its worst case is released. An owner is dead when its heartbeat is
    OWNER_TIMEOUT old, or it ran on this machine and its pid is gone or is now this process's;
    reservations without an owner are from before owners were kept. A dead owner is forgotten,
    whether it held anything or not (every start of arbstr is a new one)."""
    p = db.param
    owners = db.execute_sql(
        f"SELECT owner, host, pid, heartbeat_at FROM budget_owners WHERE owner <> {p} UNION "
        f"SELECT r.owner, NULL, NULL, NULL FROM budget_reservations r LEFT JOIN budget_owners o "
        f"ON o.owner = r.owner WHERE o.owner IS NULL AND r.owner <> {p}", (me.token, me.token)).fetchall()
    dead = [owner for owner, host, pid, beat in owners
            if beat is None or at - beat > OWNER_TIMEOUT
            or host == me.host and (pid == me.pid or not alive(pid))]
    done = []
    for owner in dead:
        names = [row[0] for row in db.execute_sql(
            f"SELECT DISTINCT budget FROM budget_reservations WHERE owner = {p}", (owner,)).fetchall()]
        with _locked(db, names):  # read again under the lock: another instance may have reclaimed it first
            held = db.execute_sql(f"SELECT reservation, budget, bucket, amount_nsats, expected_nsats "
                                  f"FROM budget_reservations WHERE owner = {p}", (owner,)).fetchall()
            for _, budget, bucket, amount, expected in held:
                _move(db, budget, bucket, amount, expected)
            db.execute_sql(f"DELETE FROM budget_reservations WHERE owner = {p}", (owner,))
            db.execute_sql(f"DELETE FROM budget_owners WHERE owner = {p}", (owner,))
        if held:
            done.append(Reclaimed(owner, len({row[0] for row in held}), from_nsats(sum(r[3] for r in held)),
                                  from_nsats(sum(r[4] for r in held))))
    return done


# On the event loop. --------------------------------------------------------------------------------


PROCESS = Owner.this_process()
"""The owner of every reservation this process makes."""


WEBHOOK_TIMEOUT = 10.0
"""Seconds one POST to the alert webhook may take."""
WEBHOOK_RETRY_DELAYS = (1.0, 4.0, 16.0)
"""Seconds before each new try of an alert the webhook did not take: about 21 s in all, then it is dropped."""


def budgets_from_config(config: Config) -> list[Budget]:
    default = tuple(config.budget_alerts.thresholds)
    return [Budget(b.name, b.limit_sats, b.window, *b.scope, thresholds=tuple(b.alerts) if b.alerts else default)
            for b in config.budgets]


@dataclass(frozen=True, slots=True)
class Hold:
    """One candidate's reservation, to settle or release."""

    reservation: str
    budgets: tuple[Budget, ...]


class BudgetKeeper:
    """The configured budgets of a running arbstr: reserve before sending, settle when done."""

    def __init__(self, budgets: Sequence[Budget], ledger: Ledger | None, webhook: str | None = None,
                 clock: Callable[[], float] = time.time, owner: Owner | None = None) -> None:
        self.budgets = tuple(budgets) if ledger is not None else ()
        self.ledger = ledger
        self.webhook = webhook
        self.clock = clock
        self.owner = owner or PROCESS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._webhooks: set[asyncio.Task] = set()
        self._unbudgeted = RequestBudget(self, "", (), None, None)
        """What every request gets when no budget applies to it: nothing to reserve, hold or settle,
        so one shared object instead of one per request (most configurations have no budget)."""

    def for_request(self, request_id: str, plan: RoutePlan, app: str | None,
                    max_output_tokens: int | None, prompt_token_bound: int | None = None) -> RequestBudget:
        """The reservations of one request: budgets it counts against, and provider budgets."""
        if not self.budgets:
            return self._unbudgeted
        budgets = tuple(b for b in self.budgets if b.scope == "provider" or b.applies(plan.policy, plan.model, app))
        if not budgets:
            return self._unbudgeted
        return RequestBudget(self, request_id, budgets, plan, max_output_tokens, prompt_token_bound)

    async def reserve(self, reservation: str, claims: Sequence[tuple[Budget, Decimal]],
                      expected: Decimal | None = None) -> Usage | None:
        """Reserve on the ledger thread: None when done, else the standing of the budget without room."""
        self._loop = asyncio.get_running_loop()
        now, owner = self.clock(), self.owner.token
        future = self.ledger.submit(lambda: reserve(self.ledger.db, reservation, claims, now, owner, expected))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The client left while the reservation was being made: it may still be made, so undo it after.
            self.settle(Hold(reservation, tuple(b for b, _ in claims)), None)
            raise

    def settle(self, hold: Hold | None, cost: Decimal | None) -> None:
        """Settle to the actual cost (None releases); never waits: the ledger thread does it in order."""
        if hold is None:
            return
        now = self.clock()
        try:
            future = self.ledger.submit(lambda: settle(self.ledger.db, hold.reservation, cost, hold.budgets, now))
        except RuntimeError:
            # arbstr is stopping and the ledger has closed: the reservation stays in the database,
            # counted as spent at its worst case, which is what a request cut off by shutdown may have cost.
            log.warning("budget reservation %s left reserved: the ledger closed first", hold.reservation)
            return
        future.add_done_callback(self._alerted)

    def _alerted(self, future) -> None:
        """On the ledger thread: log each crossing, and hand the webhook POST to the event loop."""
        try:
            alerts = future.result()
        except Exception:
            log.exception("could not settle a budget reservation")
            return
        for alert in alerts:
            log.warning("%s", alert.describe())
            if self.webhook and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._post, json.dumps(alert.to_payload()).encode())

    def _post(self, body: bytes) -> None:
        task = asyncio.ensure_future(post_webhook(self.webhook, body))
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def look_after(self) -> list[Reclaimed]:
        """Note that this process is alive, and take back what dead processes left reserved (logged)."""
        if not self.budgets:
            return []
        ledger, owner, at = self.ledger, self.owner, time.time()  # liveness is wall time, whatever the windows follow

        def beat_and_reclaim() -> list[Reclaimed]:
            with ledger.db.atomic():
                heartbeat(ledger.db, owner, at)
            return reclaim(ledger.db, owner, at)
        done = await asyncio.wrap_future(ledger.submit(beat_and_reclaim))
        for r in done:
            log.warning("budgets: took back %s sats reserved by %d requests of a process that died before they "
                        "settled (owner %s); counted as spent: %s sats, what they were expected to cost",
                        format_sats(r.reserved), r.requests, r.owner, format_sats(r.counted))
        return done

    async def standings(self) -> list[Usage]:
        if not self.budgets:
            return []
        now = self.clock()
        return await asyncio.wrap_future(self.ledger.submit(lambda: standings(self.ledger.db, self.budgets, now)))


class RequestBudget:
    """One request's reservation, made per candidate just before it is tried: the plan runner asks
    `admit` before each attempt and `release` after a failed one; the request's end settles it."""

    def __init__(self, keeper: BudgetKeeper, request_id: str, budgets: tuple[Budget, ...], plan: RoutePlan | None,
                 max_output_tokens: int | None, prompt_token_bound: int | None = None) -> None:
        self.keeper, self.request_id, self.budgets, self.plan = keeper, request_id, budgets, plan
        self.max_output_tokens = max_output_tokens
        self.prompt_token_bound = prompt_token_bound
        self.hold: Hold | None = None
        self.refused: BudgetExceeded | None = None
        """The last provider cap that made a candidate be skipped."""
        self._tries = 0

    async def admit(self, candidate: Candidate) -> str | None:
        """Reserve the candidate's worst case: None to go ahead, or why to skip it (its provider's
        cap is reached). BudgetExceeded when a cap on the whole request is reached."""
        counted = [b for b in self.budgets if b.scope != "provider" or b.match == candidate.provider]
        if not counted:
            return None
        worst = worst_case_cost(candidate, self.plan, self.max_output_tokens, self.prompt_token_bound)
        claims = [(b, worst) for b in counted]
        self._tries += 1
        reservation = f"{self.request_id}-{self._tries}"
        full = await self.keeper.reserve(reservation, claims, expected_cost(candidate, worst))
        if full is None:
            self.hold = Hold(reservation, tuple(b for b, _ in claims))
            return None
        refused = refusal(full, claims[0][1])
        if full.budget.scope != "provider":
            raise refused
        self.refused = refused
        return f"budget {full.budget.name} reached"

    def release(self) -> None:
        self.settle(None)

    def settle(self, cost: Decimal | None) -> None:
        """What the request cost (None releases the reservation); later calls do nothing."""
        hold, self.hold = self.hold, None
        self.keeper.settle(hold, cost)

    def take(self) -> RequestBudget:
        """Hand the reservation over to whoever ends the request (a stream's settler); this one then holds nothing."""
        if not self.budgets:
            return self  # holds nothing, ever
        taken = RequestBudget(self.keeper, self.request_id, self.budgets, self.plan, self.max_output_tokens,
                              self.prompt_token_bound)
        taken.hold, self.hold = self.hold, None
        return taken


async def post_webhook(url: str, body: bytes, retry_delays: Sequence[float] = WEBHOOK_RETRY_DELAYS) -> bool:
    """POST an alert as JSON, again after each of `retry_delays` seconds while it fails (no answer,
    or a 5xx, 408 or 429); True once delivered. Runs as a task of its own: no request waits for it."""
    for attempt, delay in enumerate((*retry_delays, None)):
        failure = await _post_once(url, body)
        if failure is None:
            return True
        text = f"HTTP {failure}" if isinstance(failure, int) else failure
        if delay is None or isinstance(failure, int) and failure < 500 and failure not in (408, 429):
            log.warning("the budget alert webhook failed: %s; the alert is not sent", text)
            return False
        log.info("the budget alert webhook failed (%s); trying again in %g s (%d of %d)",
                 text, delay, attempt + 1, len(retry_delays))
        await asyncio.sleep(delay)
    return False


async def _post_once(url: str, body: bytes) -> int | str | None:
    """One POST: None when the webhook took it (2xx), else its status, or what kept it from answering."""
    client = HttpClient(WEBHOOK_TIMEOUT)
    try:
        async with asyncio.timeout(WEBHOOK_TIMEOUT):
            response = await client.request("POST", url, [(b"content-type", b"application/json"),
                                                          (b"user-agent", b"arbstr")], body)
            await response.read(64 * 1024)
        return None if 200 <= response.status < 300 else response.status
    except (TimeoutError, HttpError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        await client.aclose()
