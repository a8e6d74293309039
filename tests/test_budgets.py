"""Budgets: windows, scopes and worst cases (pure), and reservations on real SQLite files with an
injected clock: exact under concurrency, released on failure, alerted once per crossing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from decimal import Decimal

import pytest

from arbstr import budgets
from arbstr.budgets import (Budget, BudgetExceeded, BudgetKeeper, Owner, alert_level, budgets_from_config,
                            current_period, heartbeat, reclaim, reserve, settle, standings, worst_case_cost)
from arbstr.errors import ConfigError
from arbstr.estimator import Outlook, RatioStats, forecast_output
from arbstr.policy import Policy
from arbstr.pricing import Rates
from arbstr.router import Catalogue, ProviderOffer, RouteRequest, plan_route
from arbstr.store import Ledger

from conftest import FakeClock, at, make_config, provider_toml


def outlook(input_tokens: int, max_tokens: int | None) -> Outlook:
    """Replies a tenth of the input, capped at the client's max_tokens."""
    return Outlook(forecast_output(input_tokens, RatioStats(0.1, 0.0, 1), max_tokens), {})


class TestWindows:
    NOW = at("2026-11-25T15:30:00")  # a Wednesday

    @pytest.mark.parametrize("window, start, resets", [
        ("day", "2026-11-25T00:00:00", "2026-11-26T00:00:00"),
        ("week", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("month", "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
    ])
    def test_calendar_windows_are_utc(self, window, start, resets):
        period = current_period(window, self.NOW)
        assert (period.start, period.resets_at) == (at(start), at(resets))

    def test_december_rolls_into_january(self):
        assert current_period("month", at("2026-12-31T23:59:59")).resets_at == at("2027-01-01T00:00:00")

    def test_rolling_windows_look_back(self):
        assert current_period("1h", self.NOW).start == self.NOW - 3600
        assert current_period("24h", self.NOW).start == self.NOW - 86400
        assert current_period("24h", self.NOW).resets_at is None


class TestScopesAndCosts:
    def test_a_budget_counts_only_its_scope(self):
        assert Budget("all", Decimal(1), "day").applies("p", "m", None)
        assert Budget("b", Decimal(1), "day", "policy", "code").applies("code", "m", None)
        assert not Budget("b", Decimal(1), "day", "policy", "code").applies("default", "m", None)
        assert Budget("b", Decimal(1), "day", "app", "ci").applies("p", "m", "ci")
        assert not Budget("b", Decimal(1), "day", "app", "ci").applies("p", "m", None)
        assert Budget("b", Decimal(1), "day", "provider", "x").applies("p", "m", None, "x")

    def test_worst_case_is_max_cost_else_max_tokens_else_the_estimate(self):
        catalogue = Catalogue([ProviderOffer("a", "m", Rates(Decimal(1), Decimal(10), Decimal("0.5")), 0),
                               ProviderOffer("b", "m", Rates(Decimal(1), Decimal(10)), 1, max_cost=Decimal(7))])
        plan = plan_route(RouteRequest("m", 100), catalogue, Policy("default", "cheapest"), outlook(100, 1000))
        a, b = (plan.candidate(n) for n in "ab")
        assert worst_case_cost(b, plan, 1000) == Decimal(7)  # what the provider says it may charge
        assert worst_case_cost(a, plan, 1000) == Decimal("10.6")  # 100 in + 1000 out + 0.5
        unbounded = plan_route(RouteRequest("m", 100), catalogue, Policy("default", "cheapest"), outlook(100, None))
        assert worst_case_cost(unbounded.candidate("a"), unbounded, None) == unbounded.candidate("a").estimated_cost

    def test_a_request_bounded_in_both_sizes_reserves_no_more_than_it_can_be_billed(self):
        # A node lists max_cost for a full context window (34 sats on a real gpt-4o-mini node): a
        # request of at most 300 prompt tokens and max_tokens 100 can be billed far less.
        catalogue = Catalogue([ProviderOffer("a", "m", Rates(Decimal("1.515"), Decimal("6.06")), 0,
                                             advertised_fee=Decimal("0.001"), max_cost=Decimal("34.13")),
                               ProviderOffer("b", "m", Rates(Decimal(1), Decimal(10)), 1, max_cost=Decimal("0.5"))])
        plan = plan_route(RouteRequest("m", 100), catalogue, Policy("default", "cheapest"), outlook(100, 100))
        a, b = (plan.candidate(n) for n in "ab")
        # ceil(300 × 1.515 + 100 × 6.06) msats = 1061, plus the 1 msat fee it advertises
        assert worst_case_cost(a, plan, 100, 300) == Decimal("1.062")
        assert worst_case_cost(b, plan, 100, 300) == Decimal("0.5")  # its max_cost is lower still
        assert worst_case_cost(a, plan, None, 300) == Decimal("34.13")  # no bound on the reply
        assert worst_case_cost(a, plan, 100, None) == Decimal("34.13")  # no bound on the prompt (media)

    def test_config_names_what_is_wrong_with_a_budget(self):
        alpha = provider_toml("alpha", "https://a.example", ["m"], 1, 1)
        with pytest.raises(ConfigError) as err:
            make_config(alpha, extra='[[budgets]]\nname = "b"\nlimit_sats = -1\nwindow = "fortnight"\n'
                                     'provider = "alpha"\napp = "x"\nalerts = [0]\n'
                                     '[[budgets]]\nname = "c"\nlimit_sats = 1\nwindow = "day"\nprovider = "zeta"\n')
        text = " | ".join(err.value.problems)
        for expected in ("budgets[b].limit_sats", "unknown window 'fortnight'", "budgets[b].alerts"):
            assert expected in text
        with pytest.raises(ConfigError) as err:
            make_config(alpha, extra='[[budgets]]\nname = "b"\nlimit_sats = 1\nwindow = "day"\nprovider = "alpha"\n'
                                     'app = "x"\n')
        assert "budget 'b' sets more than one of policy, model, provider, app" in err.value.message
        nope = '[[budgets]]\nname = "m"\nlimit_sats = 1\nwindow = "day"\nmodel = "nope"\n'
        warning = "budgets[m].model: no provider offers 'nope', so it counts nothing"
        assert warning in make_config(alpha + 'pricing = "config"\n', extra=nope).warnings()
        assert warning not in make_config(alpha, extra=nope).warnings()  # a live provider may list it
        with pytest.raises(ConfigError) as err:
            make_config(alpha, extra='[[budgets]]\nname = "c"\nlimit_sats = 1\nwindow = "day"\nprovider = "zeta"\n')
        assert "budgets[c].provider: no provider is named 'zeta'; known: alpha" in err.value.message

    def test_alert_levels(self):
        assert alert_level((50, 80, 100), Decimal(49), Decimal(100)) == 0
        assert alert_level((50, 80, 100), Decimal(80), Decimal(100)) == 80
        assert alert_level((50, 80, 100), Decimal(130), Decimal(100)) == 100

    def test_config_scopes_and_thresholds(self):
        config = make_config(provider_toml("alpha", "https://a.example", ["m"], 1, 1), extra="""
[budget_alerts]
thresholds = [90]
[[budgets]]
name = "everything"
limit_sats = 1000
window = "month"
[[budgets]]
name = "alpha-daily"
limit_sats = 10.5
window = "day"
provider = "alpha"
alerts = [100, 25]
""")
        assert budgets_from_config(config) == [
            Budget("everything", Decimal(1000), "month", "all", None, (90,)),
            Budget("alpha-daily", Decimal("10.5"), "day", "provider", "alpha", (25, 100))]



@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(str(tmp_path / "budgets.db"))
    yield ledger
    ledger.close()


DAILY = Budget("daily", Decimal(10), "day")


def on(ledger: Ledger, function):
    return ledger.call(lambda: function(ledger.db))


class TestReservations:
    def test_reserve_until_full_then_refuse_naming_the_standing(self, ledger):
        now = at("2026-11-25T10:00:00")
        for i in range(3):
            assert on(ledger, lambda db: reserve(db, f"r{i}", [(DAILY, Decimal(3))], now)) is None
        full = on(ledger, lambda db: reserve(db, "r3", [(DAILY, Decimal(3))], now))
        assert (full.budget, full.spent, full.reserved, full.remaining) == (DAILY, 0, 9, 1)
        assert full.resets_at == at("2026-11-26T00:00:00")
        assert on(ledger, lambda db: reserve(db, "r4", [(DAILY, Decimal(1))], now)) is None  # exactly to the limit

    def test_all_or_nothing_across_budgets(self, ledger):
        now = at("2026-11-25T10:00:00")
        small = Budget("small", Decimal(2), "1h", "model", "m")
        full = on(ledger, lambda db: reserve(db, "r", [(DAILY, Decimal(3)), (small, Decimal(3))], now))
        assert full.budget == small
        assert ledger.call(lambda: ledger.db.execute_sql("SELECT COUNT(*) FROM budget_reservations").fetchone()) == (0,)

    def test_settle_to_the_cost_or_release(self, ledger):
        now = at("2026-11-25T10:00:00")
        for name in ("kept", "released"):
            on(ledger, lambda db: reserve(db, name, [(DAILY, Decimal(4))], now))
        on(ledger, lambda db: settle(db, "kept", Decimal("1.25"), [DAILY], now))
        on(ledger, lambda db: settle(db, "released", None, [DAILY], now))
        [usage] = on(ledger, lambda db: standings(db, [DAILY], now))
        assert (usage.spent, usage.reserved, usage.remaining) == (Decimal("1.25"), 0, Decimal("8.75"))

    def test_windows_move_with_the_clock(self, ledger):
        start = at("2026-11-25T23:30:00")
        hourly = Budget("hourly", Decimal(10), "1h")
        on(ledger, lambda db: reserve(db, "a", [(DAILY, Decimal(6)), (hourly, Decimal(6))], start))
        on(ledger, lambda db: settle(db, "a", Decimal(6), [DAILY, hourly], start))
        refused = on(ledger, lambda db: reserve(db, "b", [(hourly, Decimal(6))], start + 1800))
        # spend is kept in minute buckets: it ages out of the rolling hour with its whole minute
        assert refused.resets_at == start + 3660
        assert on(ledger, lambda db: reserve(db, "c", [(hourly, Decimal(6))], start + 3659)) is not None
        assert on(ledger, lambda db: reserve(db, "c", [(hourly, Decimal(6))], start + 3660)) is None
        assert on(ledger, lambda db: reserve(db, "d", [(DAILY, Decimal(6))], start + 1799)) is not None
        assert on(ledger, lambda db: reserve(db, "e", [(DAILY, Decimal(6))], start + 1800)) is None  # a new day

    def test_alerts_once_per_crossing(self, ledger):
        now = at("2026-11-25T10:00:00")
        budget = Budget("watched", Decimal(100), "day", thresholds=(50, 80, 100))
        crossed = []
        for i, cost in enumerate([30, 25, 10, 20, 5, 40]):
            on(ledger, lambda db: reserve(db, f"r{i}", [(budget, Decimal(1))], now))
            crossed.append([a.threshold for a in on(ledger, lambda db: settle(db, f"r{i}", Decimal(cost), [budget], now))])
        assert crossed == [[], [50], [], [80], [], [100]]
        next_day = now + 86400
        on(ledger, lambda db: reserve(db, "n", [(budget, Decimal(1))], next_day))
        assert [a.threshold for a in on(ledger, lambda db: settle(db, "n", Decimal(90), [budget], next_day))] == [50, 80]

    def test_several_instances_on_one_file_never_overshoot(self, tmp_path):
        assert race_instances(str(tmp_path / "shared.db")) == (33, Decimal(99))


class TestDeadOwners:
    """What a process killed mid-request left reserved is taken back, by the owner rules."""

    NOW = at("2026-11-25T10:00:00")
    ME = Owner("me", "this-host", 100)

    def held(self, ledger, owner: Owner | None, beat: float | None = None, name: str = "r") -> None:
        """A 4-sat reservation expected to cost 1, by `owner` (None: from before owners were kept)."""
        token = owner.token if owner else ""
        on(ledger, lambda db: reserve(db, name, [(DAILY, Decimal(4))], self.NOW, token, Decimal(1)))
        if owner is not None:
            on(ledger, lambda db: heartbeat(db, owner, self.NOW if beat is None else beat))

    def reclaim(self, ledger, at_: float | None = None, dead_pids: frozenset[int] = frozenset()) -> list:
        when = self.NOW if at_ is None else at_
        return on(ledger, lambda db: reclaim(db, self.ME, when, alive=lambda pid: pid not in dead_pids))

    def standing(self, ledger):
        [usage] = on(ledger, lambda db: standings(db, [DAILY], self.NOW))
        return usage.spent, usage.reserved

    def test_a_dead_pid_on_this_machine_is_reclaimed_at_once_at_its_expected_cost(self, ledger):
        self.held(ledger, Owner("crashed", "this-host", 41))
        self.held(ledger, Owner("running", "this-host", 42), name="live")
        [taken] = self.reclaim(ledger, dead_pids=frozenset({41}))
        assert (taken.owner, taken.requests, taken.reserved, taken.counted) == ("crashed", 1, 4, 1)
        assert self.standing(ledger) == (1, 4)  # the live process keeps its 4
        assert self.reclaim(ledger, dead_pids=frozenset({41})) == []  # once

    def test_this_pid_under_another_owner_is_a_previous_life(self, ledger):
        # A container's arbstr is pid 1 at every start: the pid alone cannot tell the dead from the living.
        self.held(ledger, Owner("before-restart", "this-host", self.ME.pid))
        assert [t.owner for t in self.reclaim(ledger)] == ["before-restart"]

    def test_another_machine_counts_as_dead_only_after_its_heartbeat_times_out(self, ledger):
        self.held(ledger, Owner("elsewhere", "other-host", 41), beat=self.NOW)
        assert self.reclaim(ledger, self.NOW + budgets.OWNER_TIMEOUT, dead_pids=frozenset({41})) == []
        assert [t.owner for t in self.reclaim(ledger, self.NOW + budgets.OWNER_TIMEOUT + 1)] == ["elsewhere"]
        assert self.standing(ledger) == (1, 0)

    def test_own_and_ownerless_reservations(self, ledger):
        self.held(ledger, self.ME, name="mine")
        self.held(ledger, None, name="old")
        [taken] = self.reclaim(ledger, self.NOW + 10 * budgets.OWNER_TIMEOUT)
        assert taken.owner == "" and self.standing(ledger) == (1, 4)

    def test_a_settlement_after_its_reservation_was_reclaimed_still_counts(self, ledger):
        self.held(ledger, Owner("stalled", "other-host", 41), beat=self.NOW)
        self.reclaim(ledger, self.NOW + budgets.OWNER_TIMEOUT + 1)
        on(ledger, lambda db: settle(db, "r", Decimal("2.5"), [DAILY], self.NOW))
        assert self.standing(ledger) == (Decimal("3.5"), 0)  # the expected 1 and what it really cost

    def test_a_dead_owner_that_holds_nothing_is_forgotten(self, ledger):
        # every start of arbstr is a new owner: without this the table would grow by one row a start
        on(ledger, lambda db: heartbeat(db, Owner("stopped", "this-host", 41), self.NOW))
        on(ledger, lambda db: heartbeat(db, Owner("running", "this-host", 42), self.NOW))
        assert self.reclaim(ledger, dead_pids=frozenset({41})) == []
        owners = ledger.call(lambda: ledger.db.execute_sql("SELECT owner FROM budget_owners").fetchall())
        assert owners == [("running",)]

    def test_the_keeper_beats_and_reclaims_on_the_ledger_thread(self, ledger, caplog):
        self.held(ledger, Owner("crashed", budgets.PROCESS.host, 2 ** 22 + 1))  # above Linux's pid_max default
        keeper = BudgetKeeper([DAILY], ledger, clock=FakeClock(self.NOW))
        [taken] = asyncio.run(keeper.look_after())
        assert taken.owner == "crashed" and "took back 4 sats reserved by 1 requests" in caplog.text
        beats = ledger.call(lambda: ledger.db.execute_sql("SELECT owner, pid FROM budget_owners").fetchall())
        assert beats == [(budgets.PROCESS.token, os.getpid())]


def race_instances(url: str, instances: int = 6) -> tuple[int, Decimal]:
    """Ledgers on one database (as several arbstr processes would have), each reserving 3 sats at
    once against a 100-sat budget: (reservations granted, total reserved)."""
    ledgers = [Ledger(url) for _ in range(instances)]
    budget = Budget("shared", Decimal(100), "day")
    now = at("2026-11-25T10:00:00")
    granted = []

    def worker(ledger: Ledger, n: int) -> None:
        for i in range(20):
            if ledger.call(lambda: reserve(ledger.db, f"{n}-{i}", [(budget, Decimal(3))], now)) is None:
                granted.append(1)

    threads = [threading.Thread(target=worker, args=(ledger, n)) for n, ledger in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [usage] = on(ledgers[0], lambda db: standings(db, [budget], now))
    for ledger in ledgers:
        ledger.close()
    return len(granted), usage.reserved


class TestKeeper:
    @pytest.mark.parametrize("running", [False, True])
    def test_a_reservation_cut_short_by_a_client_leaving_is_undone(self, ledger, monkeypatch, running):
        clock = FakeClock(at("2026-11-25T10:00:00"))
        keeper = BudgetKeeper([DAILY], ledger, clock=clock)
        started = threading.Event()

        def slow_reserve(*args):
            started.set()
            time.sleep(0.2)  # the client leaves while the database thread is making the reservation
            return reserve(*args)

        monkeypatch.setattr(budgets, "reserve", slow_reserve)

        busy = threading.Event()
        if not running:
            ledger.submit(lambda: busy.wait(5))  # the reservation waits its turn behind this

        async def leave_while_reserving() -> None:
            task = asyncio.ensure_future(keeper.reserve("gone", [(DAILY, Decimal(5))]))
            if running:
                await asyncio.to_thread(started.wait, 5)
            else:
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            busy.set()

        asyncio.run(leave_while_reserving())
        [usage] = on(ledger, lambda db: standings(db, [DAILY], clock.now))
        assert usage.reserved == 0 and started.is_set() == running

    def test_the_refusal_is_openai_shaped_and_names_the_budget(self, ledger):
        clock = FakeClock(at("2026-11-25T10:00:00"))
        config = make_config(provider_toml("alpha", "https://a.example", ["m"], 1000, 1000))
        plan = plan_route(RouteRequest("m", 10), Catalogue.from_providers(config.providers),
                          Policy("default", "cheapest"), outlook(10, 10))
        keeper = BudgetKeeper([DAILY], ledger, clock=clock)
        request = keeper.for_request("req", plan, None, 10)
        with pytest.raises(BudgetExceeded) as err:
            asyncio.run(request.admit(plan.best))
        payload = err.value.to_payload()["error"]
        assert err.value.status == 429 and payload["code"] == "budget_exceeded" and payload["budget"] == "daily"
        assert (payload["limit_sats"], payload["spent_sats"], payload["requested_sats"]) == ("10", "0", "20")
        assert payload["resets_at"] == "2026-11-26T00:00:00Z"


class TestWebhook:
    FAST = (0.01, 0.01, 0.01)

    def test_a_failure_is_tried_again_until_taken(self, webhook):
        webhook.statuses = [503, 429, 408]
        assert asyncio.run(budgets.post_webhook(webhook.url, b'{"n": 1}', self.FAST))
        assert webhook.posts == [(503, {"n": 1}), (429, {"n": 1}), (408, {"n": 1}), (204, {"n": 1})]

    def test_a_refusal_is_not_tried_again(self, webhook, caplog):
        webhook.statuses = [400]
        assert not asyncio.run(budgets.post_webhook(webhook.url, b"{}", self.FAST))
        assert len(webhook.posts) == 1 and "failed: HTTP 400; the alert is not sent" in caplog.text

    def test_it_gives_up_after_the_last_delay(self, webhook, caplog):
        webhook.statuses = [500] * 10
        assert not asyncio.run(budgets.post_webhook(webhook.url, b"{}", self.FAST))
        assert len(webhook.posts) == 4 and "failed: HTTP 500; the alert is not sent" in caplog.text
