"""Spending caps through the real proxy: exact under 1,000 concurrent requests, per scope, a
provider over its own cap passed over, reservations released on failover and on a client leaving,
spend kept across a restart, and each alert threshold crossed once (log, /health, webhook)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from arbstr.server import build_master
from conftest import FakeClock, at, chat_requests, make_config, provider_toml as live_provider_toml
from e2e.conftest import BIN, CLIENT_KEY, KINDS, RunningProxy
from test_store_postgres import database_url, server  # noqa: F401  (fixtures: a PostgreSQL of the test's own)

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
TIGHT = {"context_length": 18, "max_completion_tokens": 10}
"""Model limits whose `max_cost` (what a request reserves) is BODY's worst case: 8 prompt + 10 reply tokens."""
WORST = Decimal("1.018")
"""What BODY reserves at `cheap`, its listed max_cost: (8 prompt tokens + 10) x 1 sat/1k + the 1 sat fee."""
COST = Decimal("1.008")
"""What `cheap` charges for it: 5 prompt tokens, 3 reply words, 1 sat fee."""


def priced(*args, **kwargs) -> str:
    """A provider at the configured rates: what each request reserves and costs is then exact here."""
    return live_provider_toml(*args, **kwargs) + 'pricing = "config"\n'


def budget_toml(name: str, limit: float | str, window: str = "day", **scope: str) -> str:
    lines = [f'[[budgets]]\nname = "{name}"\nlimit_sats = {limit}\nwindow = "{window}"\n']
    lines += [f'{key} = {json.dumps(value)}\n' for key, value in scope.items()]
    return "".join(lines)


@pytest.fixture
def cheap_and_dear(start_provider, tmp_path):
    # nodes that bill the request fee they advertise, as the config's base_fee says
    cheap = start_provider("cheap", ["gpt-4o", "gpt-4o-mini"], 0.001, 0.001, 1, bills_request_fee=True, **TIGHT)
    dear = start_provider("dear", ["gpt-4o", "gpt-4o-mini"], 0.002, 0.002, 2, bills_request_fee=True, **TIGHT)
    db = tmp_path / "ledger.db"
    config = (priced("cheap", cheap.url, ["gpt-4o", "gpt-4o-mini"], 1, 1, 1)
              + priced("dear", dear.url, ["gpt-4o", "gpt-4o-mini"], 2, 2, 2)
              + f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n')
    return cheap, dear, config, db


def standing(proxy, name: str, settled: bool = True) -> dict:
    """A budget as GET /v1/budgets shows it; with `settled`, once nothing is reserved any more
    (settlement is written off the event loop, a moment after the answer)."""
    deadline = time.monotonic() + 10
    with proxy.http() as http:
        while True:
            budget = next(b for b in http.get("/v1/budgets").json()["data"] if b["name"] == name)
            if not settled or budget["reserved_sats"] == "0" or time.monotonic() > deadline:
                return budget
            time.sleep(0.05)


@pytest.mark.timeout(300)  # a few seconds on a quiet machine; minutes when the machine is shared
def test_a_thousand_concurrent_requests_overshoot_by_at_most_one_reservation(cheap_and_dear, start_proxy):
    cheap, dear, config, db = cheap_and_dear
    limit = Decimal(100)
    # Only cheap serves here, with deadlines long enough for 1,000 connections at once on a shared machine.
    config = (priced("cheap", cheap.url, ["gpt-4o"], 1, 1, 1) + f'[database]\npath = "{db}"\n'
              + '[routing]\nhealth_interval = 0\nconnect_timeout = 60\nheader_timeout = 120\n')
    proxy = start_proxy("serve", config + budget_toml("cap", limit) + '[server]\nauth_token = "%s"\n' % CLIENT_KEY)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=120, limits=limits,
                                     headers={"authorization": f"Bearer {CLIENT_KEY}"}) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=BODY) for _ in range(1000)))

    answers = asyncio.run(burst())
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 429}, set(statuses)
    refused = [a.json()["error"] for a in answers if a.status_code == 429]
    assert {e["code"] for e in refused} == {"budget_exceeded"} and {e["budget"] for e in refused} == {"cap"}
    budget = standing(proxy, "cap")
    spent = Decimal(budget["spent_sats"])
    assert budget["reserved_sats"] == "0"
    assert spent <= limit + WORST  # the bound; reserving the worst case keeps it at the limit itself
    assert spent <= limit and spent > limit - 2 * WORST  # and the cap is used, not refused early
    assert spent == statuses.count(200) * COST
    assert len(chat_requests(cheap)) == statuses.count(200) and not chat_requests(dear)
    with proxy.http() as http:
        assert Decimal(http.get("/v1/stats").json()["totals"]["cost_sats"]) == spent


def test_two_instances_on_one_postgresql_share_a_cap(start_provider, database_url, tmp_path):
    cheap = start_provider("cheap", ["gpt-4o"], 0.001, 0.001, 1, bills_request_fee=True, **TIGHT)
    limit = Decimal(20)
    path = tmp_path / "config.toml"
    path.write_text(priced("cheap", cheap.url, ["gpt-4o"], 1, 1, 1) + '[routing]\nhealth_interval = 0\n'
                    + budget_toml("shared", limit))
    env = {**os.environ, "DATABASE_URL": database_url}
    instances: list[RunningProxy] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            instances.append(RunningProxy("serve", path, tmp_path / name, env))

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(f"{instances[i % 2].url}/v1/chat/completions", json=BODY)
                                              for i in range(60)))
        for proxy in instances:  # each serves one first, then they race for the rest of the room
            with proxy.http() as http:
                assert http.post("/v1/chat/completions", json=BODY).status_code == 200
        statuses = [200, 200] + [a.status_code for a in asyncio.run(burst())]
        assert set(statuses) == {200, 429}
        views = [standing(proxy, "shared") for proxy in instances]
    finally:
        for proxy in instances:
            proxy.stop()
    assert views[0] == views[1] and views[0]["reserved_sats"] == "0"
    spent = Decimal(views[0]["spent_sats"])
    assert spent == statuses.count(200) * COST and limit - 2 * WORST < spent <= limit


def test_scopes_and_a_provider_over_its_own_cap(cheap_and_dear, start_proxy):
    cheap, dear, config, db = cheap_and_dear
    proxy = start_proxy("serve", config
                        + '[[policies.rules]]\nname = "code"\nkeywords = ["python"]\n'
                        + budget_toml("cheap-cap", 2.1, provider="cheap")
                        + budget_toml("code-cap", 0.5, "1h", policy="code")
                        + budget_toml("mini-cap", 0.5, "week", model="gpt-4o-mini")
                        + budget_toml("ci-cap", 3, "month", app="ci"))
    with proxy.http() as http:
        def ask(**overrides) -> httpx.Response:
            headers = overrides.pop("headers", {})
            return http.post("/v1/chat/completions", json={**BODY, **overrides}, headers=headers)

        served = [ask().headers["x-arbstr-provider"] for _ in range(3)]
        # cheap reserves 1.018 each: two fit under its 2.1 cap, then it is passed over for dear
        assert served == ["cheap", "cheap", "dear"]
        skipped = ask()
        assert skipped.headers["x-arbstr-attempts"] == "cheap=budget"
        pinned = ask(headers={"x-arbstr-provider": "cheap"})
        error = pinned.json()["error"]
        assert pinned.status_code == 429 and (error["code"], error["budget"]) == ("budget_exceeded", "cheap-cap")
        assert error["limit_sats"] == "2.1" and error["resets_at"].endswith("T00:00:00Z")
        for refused, name in [(ask(messages=[{"role": "user", "content": "python please"}]), "code-cap"),
                              (ask(model="gpt-4o-mini"), "mini-cap")]:
            assert refused.status_code == 429 and refused.json()["error"]["budget"] == name
            assert name in refused.json()["error"]["message"]
        # the app budget counts only its app: 3 sats hold one request at dear (2.036 reserved), not two
        assert ask(headers={"x-arbstr-app": "ci"}).status_code == 200
        assert ask(headers={"x-arbstr-app": "ci"}).json()["error"]["budget"] == "ci-cap"
        assert ask(headers={"x-arbstr-app": "other"}).status_code == 200
        rows = http.get("/v1/requests").json()["data"]
    assert sum(1 for r in rows if r["error"] == "budget_exceeded") == 4
    assert len(chat_requests(cheap)) == 2


def test_a_request_reserves_the_max_cost_its_node_lists_unless_its_own_sizes_bound_it_lower(start_provider, start_proxy, tmp_path):
    node = start_provider("node", ["gpt-4o", "gpt-4o-mini"], 0.001, 0.001)
    proxy = start_proxy("serve", f'[[providers]]\nname = "node"\nurl = "{node.url}"\napi_key = "sk-node-0123456789abcdef"\n'
                        '[providers.models."gpt-4o"]\n[providers.models."gpt-4o-mini"]\nmax_cost = 0.5\n'
                        f'[database]\npath = "{tmp_path / "l.db"}"\n[routing]\nhealth_interval = 0\n'
                        + budget_toml("cap", 5))
    proxy.wait_for_prices()
    with proxy.http() as http:
        # with no max_tokens the reply is bounded only by the model: the node's max_cost for a full
        # context, (8192 - 2048) prompt + 2048 reply tokens at 1 sat per 1k, is the worst case
        unbounded = {key: value for key, value in BODY.items() if key != "max_tokens"}
        refused = http.post("/v1/chat/completions", json=unbounded).json()["error"]
        assert (refused["code"], refused["requested_sats"]) == ("budget_exceeded", "8.192")
        # the config's max_cost for a model is the node's word on it
        assert http.post("/v1/chat/completions", json={**unbounded, "model": "gpt-4o-mini"}).status_code == 200
        # max_tokens and a text prompt of a few dozen bytes bound it far below max_cost
        assert http.post("/v1/chat/completions", json=BODY).status_code == 200
    assert len(chat_requests(node)) == 2


def test_failover_and_a_client_leaving_release_their_reservations(start_provider, start_proxy, tmp_path):
    flaky = start_provider("flaky", ["gpt-4o"], 0.001, 0.001, 1, fail_status=503)
    good = start_provider("good", ["gpt-4o"], 0.001, 0.001, 1)
    good.reply = " ".join(f"word{i}" for i in range(40))
    good.chunk_delay = 0.1
    hanging = start_provider("hanging", ["gpt-4o"], 0.001, 0.001, 1)
    hanging.hang = True
    proxy = start_proxy("serve", priced("flaky", flaky.url, ["gpt-4o"], 1, 1, 1)
                        + priced("good", good.url, ["gpt-4o"], 1, 1, 1)
                        + priced("hanging", hanging.url, ["gpt-4o"], 50, 50, 50)
                        + f'[database]\npath = "{tmp_path / "l.db"}"\n'
                        + '[routing]\nhealth_interval = 0\nheader_timeout = 1.5\n'
                        + budget_toml("all", 100) + budget_toml("flaky-cap", 100, provider="flaky"))
    with proxy.http() as http:
        answer = http.post("/v1/chat/completions", json={**BODY, "max_tokens": 100})
        assert answer.headers["x-arbstr-attempts"] == "flaky=status 503"
        cost = Decimal(answer.headers["x-routstr-cost-msats"]) / 1000
    assert Decimal(standing(proxy, "all")["spent_sats"]) == cost
    assert standing(proxy, "flaky-cap")["spent_sats"] == "0"  # flaky's reservation went when it failed
    # a client that leaves mid-stream: held while it streams, then what the provider billed for the
    # stream (arbstr reads the abandoned rest for its usage), nothing more
    with httpx.Client(timeout=10) as http, http.stream("POST", f"{proxy.url}/v1/chat/completions",
                                                       json={**BODY, "max_tokens": 100, "stream": True}) as stream:
        for chunk in stream.iter_raw():
            if b"word2" in chunk:
                assert standing(proxy, "all", settled=False)["reserved_sats"] != "0"
                break
    after = standing(proxy, "all")
    with proxy.http() as http:
        streamed = next(r for r in http.get("/v1/requests").json()["data"] if r["streaming"])
    assert after["reserved_sats"] == "0" and Decimal(after["spent_sats"]) == cost + Decimal(streamed["cost_sats"])
    # a client that leaves before any answer: released in full
    with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{proxy.url}/v1/chat/completions", json=BODY, headers={"x-arbstr-provider": "hanging"})
    assert standing(proxy, "all", settled=False)["reserved_sats"] != "0"  # the hanging attempt holds its worst case
    final = standing(proxy, "all")
    assert final["reserved_sats"] == "0" and final["spent_sats"] == after["spent_sats"]


def delivered(webhook, count: int) -> list[dict]:
    """The alerts the webhook took, once there are `count` (alerts are POSTed off the request path)."""
    deadline = time.monotonic() + 30
    while len(webhook.delivered) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return webhook.delivered


def test_alerts_once_per_threshold_and_spend_survives_a_restart(start_provider, start_proxy, webhook, tmp_path):
    # No prompt price and a 3-token reply limit (the reply's 3 words): each request reserves the
    # node's max_cost, exactly what it costs (1.003 sats), so spend can reach a limit and every
    # threshold be crossed.
    exact = start_provider("exact", ["gpt-4o"], 0, 0.001, 1, max_completion_tokens=3, bills_request_fee=True)
    db = tmp_path / "ledger.db"
    config = (priced("exact", exact.url, ["gpt-4o"], 0, 1, 1)
              + f'[database]\npath = "{db}"\n[routing]\nhealth_interval = 0\n'
              + budget_toml("five", 5) + budget_toml("ci", "3.009", "24h", app="ci")
              + f'[budget_alerts]\nwebhook = "{webhook.url}"\n')
    proxy = start_proxy("serve", config)
    body = {**BODY, "max_tokens": 3}
    with proxy.http() as http:
        statuses = [http.post("/v1/chat/completions", json=body, headers={"x-arbstr-app": app}).status_code
                    for app in ("ci", "ci", "ci", "other", "other", "ci")]
        assert statuses == [200, 200, 200, 200, 429, 429]
        standing(proxy, "five")
        health = http.get("/health").json()
    received = delivered(webhook, 5)
    crossed = sorted((a["name"], a["threshold"]) for a in received)
    assert crossed == [("ci", 50), ("ci", 80), ("ci", 100), ("five", 50), ("five", 80)]
    assert all(a["event"] == "budget_threshold" and a["limit_sats"] for a in received)
    log = proxy.log()
    assert log.count("budget 'ci' (app ci) crossed 100%") == 1 and log.count("crossed 50%") == 2
    assert {b["name"]: b["alerts"] for b in health["budgets"]} == {"five": [50, 80], "ci": [50, 80, 100]}
    before = standing(proxy, "five")
    assert Decimal(before["spent_sats"]) == Decimal("4.012")
    proxy.stop()
    again = start_proxy("serve", config)
    assert standing(again, "five") == before
    with again.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 429
    time.sleep(0.3)
    assert len(webhook.delivered) == 5  # nothing crossed again after the restart
    again.stop()
    command = [str(BIN / "arbstr"), "budgets", "-c", str(tmp_path / "config.toml")]
    table = subprocess.run(command, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SCOPE", "WINDOW", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS", "ALERTS"]
    assert lines[1].split()[:7] == ["five", "all", "day", "5", "4.012", "0", "0.988"]
    assert lines[1].split()[-1] == "50%,80%"
    assert json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True).stdout)["data"][0] == before



def test_a_failing_webhook_is_retried_and_never_holds_up_a_request(start_provider, start_proxy, webhook, tmp_path):
    exact = start_provider("exact", ["gpt-4o"], 0, 0.001, 1, max_completion_tokens=3, bills_request_fee=True)
    proxy = start_proxy("serve", priced("exact", exact.url, ["gpt-4o"], 0, 1, 1)
                        + f'[database]\npath = "{tmp_path / "l.db"}"\n[routing]\nhealth_interval = 0\n'
                        + budget_toml("two", "2.006") + f'[budget_alerts]\nwebhook = "{webhook.url}"\n')
    body = {**BODY, "max_tokens": 3}  # 1.003 sats each: the first crosses 50%, the second 80 and 100
    webhook.release.clear()  # the webhook takes no answer yet: it hangs
    webhook.statuses = [503, 503]  # then its first two answers fail
    with proxy.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        standing(proxy, "two")  # settled: its alert is on its way to the hanging webhook
        assert http.post("/v1/chat/completions", json=body).status_code == 200  # not held up by it
        assert not webhook.posts
    webhook.release.set()
    received = delivered(webhook, 3)
    assert sorted(a["threshold"] for a in received) == [50, 80, 100]  # each once, after the retries
    assert [status for status, _ in webhook.posts].count(503) == 2
    assert "the budget alert webhook failed (HTTP 503); trying again in 1 s" in proxy.log()


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_killed_arbstr_reserved_is_taken_back_at_its_next_start(start_provider, start_proxy, tmp_path, kind):
    node = start_provider("node", ["gpt-4o"], 0.001, 0.001, context_length=108, max_completion_tokens=100)
    node.hang = True
    db = tmp_path / "ledger.db"
    config = (priced("node", node.url, ["gpt-4o"], 1, 1) + f'[database]\npath = "{db}"\n'
              + '[routing]\nhealth_interval = 0\nheader_timeout = 600\n' + budget_toml("cap", "0.2"))
    # A prompt whose body could hold more tokens than the model's context: each reserves the node's
    # max_cost, (8 + 100) x 1 sat/1k = 0.108 sats, and two of them do not fit under the cap.
    short = {**BODY, "messages": [{"role": "user", "content": "x " * 60}]}
    body = {**short, "max_tokens": 100}
    proxy = start_proxy(kind, config)
    proxy.wait_for_prices()  # the node's max_cost is what a request reserves: read at start, off the request path

    def ask_and_wait() -> None:
        # `short` is expected to cost at most its prompt and 10 reply tokens: about 0.05 sats
        with contextlib.suppress(httpx.HTTPError):  # its proxy is killed under it
            httpx.post(f"{proxy.url}/v1/chat/completions", json=short, timeout=60)
    waiting = threading.Thread(target=ask_and_wait)
    waiting.start()
    deadline = time.monotonic() + 60  # a wait, not a speed claim: the machine may be loaded
    while standing(proxy, "cap", settled=False)["reserved_sats"] != "0.108":
        assert time.monotonic() < deadline, "the request never reserved"
        time.sleep(0.05)
    with proxy.http() as http:
        assert http.post("/v1/chat/completions", json=body).json()["error"]["code"] == "budget_exceeded"
    proxy.process.kill()  # SIGKILL: no settlement, no release, no exit handler
    proxy.process.wait()
    waiting.join()
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT amount_nsats FROM budget_reservations").fetchall() == [(108_000_000,)]
    node.hang = False
    again = start_proxy(kind, config)
    again.wait_for_prices()
    after = standing(again, "cap")  # once nothing is reserved any more
    assert after["reserved_sats"] == "0"
    # counted as what the request was expected to cost (a node bills an abandoned request in full)
    assert Decimal(0) < Decimal(after["spent_sats"]) < Decimal("0.07")
    assert "took back 0.108 sats reserved by 1 requests of a process that died" in again.log()
    with again.http() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200  # the cap is no longer blocked


@contextlib.contextmanager
def proxy_in_process(config_text: str, clock: FakeClock) -> Iterator[str]:
    """The real proxy (the master `arbstr serve` runs, on a free port) in a thread of this process,
    so its budget windows can follow a clock the test moves."""
    started = threading.Event()
    running: dict = {}

    async def serve() -> None:
        master = build_master(make_config(config_text), host="127.0.0.1", port=0, clock=clock)
        running.update(master=master, loop=asyncio.get_running_loop())
        task = asyncio.ensure_future(master.run())
        while not (servers := master.addons.get("proxyserver").servers) or not list(servers)[0].listen_addrs:
            await asyncio.sleep(0.02)
        running["port"] = list(servers)[0].listen_addrs[0][1]
        started.set()
        try:
            await task
        finally:
            master._legacy_log_events.uninstall()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "the in-process proxy did not start"
    try:
        yield f"http://127.0.0.1:{running['port']}"
    finally:
        running["loop"].call_soon_threadsafe(running["master"].shutdown)
        thread.join(30)
        gc.unfreeze()  # what the master froze at start belongs to this test process



def test_calendar_and_rolling_windows_follow_the_clock(start_provider, tmp_path):
    exact = start_provider("exact", ["gpt-4o"], 0, 0.001, 1, max_completion_tokens=3, bills_request_fee=True)
    clock = FakeClock(at("2026-11-25T23:00:00"))
    config = (priced("exact", exact.url, ["gpt-4o"], 0, 1, 1)
              + f'[database]\npath = "{tmp_path / "l.db"}"\n[routing]\nhealth_interval = 0\n'
              + budget_toml("daily", "2.1") + budget_toml("hourly", "1.1", "1h"))
    body = {**BODY, "max_tokens": 3}  # reserves the node's max_cost, exactly what it costs: 1.003 sats

    def ask(http: httpx.Client, when: str) -> httpx.Response:
        clock.now = at(when)
        return http.post("/v1/chat/completions", json=body)

    with proxy_in_process(config, clock) as url, httpx.Client(base_url=url, timeout=20) as http:
        assert ask(http, "2026-11-25T23:00:00").status_code == 200
        for when in ("2026-11-25T23:00:30", "2026-11-25T23:59:59"):
            refused = ask(http, when).json()["error"]
            # spend is kept per minute: the 23:00 minute leaves the rolling hour at 00:01
            assert (refused["budget"], refused["resets_at"]) == ("hourly", "2026-11-26T00:01:00Z")
        assert ask(http, "2026-11-26T00:01:00").status_code == 200  # a new day, and the hour has moved on
        assert ask(http, "2026-11-26T01:10:00").status_code == 200
        refused = ask(http, "2026-11-26T02:20:00").json()["error"]
        assert (refused["budget"], refused["spent_sats"], refused["resets_at"]) == (
            "daily", "2.006", "2026-11-27T00:00:00Z")
        deadline = time.monotonic() + 10
        while (daily := http.get("/v1/budgets").json()["data"][0])["reserved_sats"] != "0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (daily["spent_sats"], daily["remaining_sats"]) == ("2.006", "0.094")
        clock.now = at("2026-11-27T00:00:00")
        assert http.get("/v1/budgets").json()["data"][0]["spent_sats"] == "0"
        assert ask(http, "2026-11-27T00:00:00").status_code == 200
