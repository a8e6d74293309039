"""The live market: per-model offers read from /v1/models, config fallback and override, held price jumps."""

from __future__ import annotations

import asyncio
import json
import socket
from decimal import Decimal
from pathlib import Path

import pytest

from arbstr.config import Config
from arbstr.engine import Engine
from arbstr.errors import ModelNotFound
from arbstr.localapi import health, list_models, list_providers
from arbstr.market import Market, MarketError, parse_model_list
from arbstr.mock import MockModel
from arbstr.pricing import Rates

from conftest import make_config, provider_toml

SAMPLES = Path(__file__).parent / "samples"


def listing(*models: tuple) -> dict:
    """A /v1/models payload: (id, prompt sats/token, completion sats/token[, enabled])."""
    return {"data": [{"id": m[0], "context_length": 4096, "enabled": m[3] if len(m) > 3 else True,
                      "sats_pricing": {"prompt": Decimal(str(m[1])), "completion": Decimal(str(m[2])),
                                       "request": Decimal("0.001"), "max_cost": Decimal("12.5")}}
                     for m in models]}


def live_config(*names: str, extra: str = "") -> Config:
    """Live-priced providers with no configured models or rates at all."""
    text = "".join(f'[[providers]]\nname = "{n}"\nurl = "http://{n}.example"\napi_key = "sk-{n}-0123456789abcdef"\n'
                   for n in names)
    return make_config(text, extra=extra)


def offered(market: Market, model: str) -> dict[str, Rates]:
    return {o.provider: o.rates for o in market.catalogue.by_model.get(model, ())}


def cheapest(engine: Engine, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi " * 50}]}).encode()
    return engine.decide("rid", body, None).plan.best.provider


class TestParseModelList:
    def test_the_real_nodes_listing(self):
        read = parse_model_list(json.loads((SAMPLES / "models.json").read_bytes(), parse_float=Decimal))
        models, skipped = read.models, read.skipped
        llama = models["llama3:8b"]
        assert llama.rates == Rates(Decimal("3.03"), Decimal("3.03"))  # sats per token × 1000, exactly
        assert llama.advertised_fee == Decimal("0.001")
        assert llama.max_cost == Decimal("12.41088")
        assert llama.context_length == 4096 and llama.enabled
        assert skipped == []

    def test_disabled_is_kept_as_disabled(self):
        assert not parse_model_list(listing(("m", 0.001, 0.002, False))).models["m"].enabled

    def test_unusable_entries_are_skipped_with_why(self):
        payload = {"data": [{"id": "ok", "sats_pricing": {"prompt": 1, "completion": 2}},
                            {"id": "noprice"}, {"name": "anonymous"},
                            {"id": "neg", "sats_pricing": {"prompt": -1, "completion": 2}},
                            {"id": "text", "sats_pricing": {"prompt": "cheap", "completion": 2}},
                            {"id": "bool", "sats_pricing": {"prompt": True, "completion": 2}}, "garbage",
                            {"id": "off", "enabled": False}]}
        read = parse_model_list(payload)
        assert list(read.models) == ["ok"]
        assert read.models["ok"].advertised_fee == 0 and read.models["ok"].max_cost is None
        assert len(read.skipped) == 7
        assert "noprice: no sats_pricing" in read.skipped and "neg: sats_pricing.prompt is not a price" in read.skipped
        assert read.unpriced == {"noprice", "neg", "text", "bool"}

    @pytest.mark.parametrize("payload", [[], {"object": "list"}, {"data": "x"}, "x", None])
    def test_not_a_listing(self, payload):
        with pytest.raises(MarketError):
            parse_model_list(payload)


class TestLiveOffers:
    def test_models_and_prices_come_from_the_listing(self):
        market = Market(live_config("a"))
        assert market.catalogue.models() == []  # never read, nothing configured: not routed
        market.adopt("a", listing(("x", 0.001, 0.002), ("y", 0.01, 0.02)))
        assert offered(market, "x") == {"a": Rates(Decimal("1.000"), Decimal("2.000"))}
        offer = market.catalogue.by_model["y"][0]
        assert (offer.advertised_fee, offer.max_cost, offer.context_length, offer.source) == (
            Decimal("0.001"), Decimal("12.5"), 4096, "live")
        assert offer.rates.per_request == 0  # advertised, not billed by real nodes: not estimated

    def test_cheap_for_x_and_dear_for_y_gets_x_only(self):
        engine = Engine(live_config("a", "b"))
        engine.market.adopt("a", listing(("x", 0.001, 0.001), ("y", 0.05, 0.05)))
        engine.market.adopt("b", listing(("x", 0.01, 0.01), ("y", 0.002, 0.002)))
        assert cheapest(engine, "x") == "a"
        assert cheapest(engine, "y") == "b"

    def test_disabled_and_removed_models_are_not_routed_and_new_ones_are(self):
        market = Market(live_config("a"))
        market.adopt("a", listing(("x", 0.001, 0.001), ("y", 0.001, 0.001)))
        market.adopt("a", listing(("x", 0.001, 0.001, False), ("z", 0.001, 0.001)))
        assert market.catalogue.models() == ["z"]

    def test_live_prices_win_over_configured_ones(self):
        market = Market(make_config(provider_toml("a", "http://a.example", ["x"], 100, 100)))
        assert offered(market, "x") == {"a": Rates(Decimal(100), Decimal(100), Decimal(0))}
        assert market.catalogue.by_model["x"][0].source == "fallback"
        market.adopt("a", listing(("x", 0.001, 0.002)))
        assert offered(market, "x") == {"a": Rates(Decimal("1.000"), Decimal("2.000"))}

    def test_unreadable_provider_falls_back_to_configured_prices_and_is_stale(self):
        config = make_config(provider_toml("a", "http://a.example", ["x"], 7, 8))
        market = Market(config)
        market.adopt("a", listing(("x", 0.001, 0.002), ("y", 0.001, 0.002)))
        market.failed("a", "HTTP 502")
        assert offered(market, "x") == {"a": Rates(Decimal(7), Decimal(8), Decimal(0))}
        assert market.catalogue.models() == ["x"]
        status = market.status(config.providers[0])
        assert (status["source"], status["stale"], status["error"]) == ("fallback", True, "HTTP 502")

    def test_unreadable_without_configured_prices_keeps_the_last_listing(self):
        market = Market(live_config("a"))
        market.adopt("a", listing(("x", 0.001, 0.002)))
        market.failed("a", "no answer within 5 s")
        assert [o.source for o in market.catalogue.by_model["x"]] == ["stale"]
        market.adopt("a", listing(("x", 0.001, 0.002)))
        assert [o.source for o in market.catalogue.by_model["x"]] == ["live"]

    def test_model_unknown_drops_it_until_the_next_read(self):
        engine = Engine(live_config("a", "b"))
        engine.market.adopt("a", listing(("x", 0.001, 0.001)))
        engine.market.adopt("b", listing(("x", 0.002, 0.002)))
        engine.model_unknown("a", "x")
        assert cheapest(engine, "x") == "b"
        engine.model_unknown("b", "x")
        with pytest.raises(ModelNotFound):
            cheapest(engine, "x")
        engine.market.adopt("a", listing(("x", 0.001, 0.001)))
        assert cheapest(engine, "x") == "a"

    def test_model_unknown_for_a_provider_arbstr_does_not_know_is_ignored(self):
        market = Market(live_config("a"))
        market.model_unknown("nobody", "x")
        assert market.catalogue.models() == []


    def test_a_listed_model_without_a_price_is_routed_at_its_configured_price(self):
        market = Market(make_config(provider_toml("a", "http://a.example", ["x", "y"], 7, 8)))
        market.adopt("a", {"data": [{"id": "x"}, {"id": "y", "enabled": False}, {"id": "z"}]})
        assert market.catalogue.models() == ["x"]
        assert [(o.source, o.rates) for o in market.catalogue.by_model["x"]] == [
            ("fallback", Rates(Decimal(7), Decimal(8), Decimal(0)))]


class TestPaidPerRequest:
    def test_the_whole_sat_an_xcashu_node_keeps_is_counted_when_choosing(self):
        # "b" is a third cheaper per token but paid by X-Cashu: its change comes back in whole sats
        text = ('[wallet]\nmints = ["http://mint.example"]\n'
                '[[providers]]\nname = "a"\nurl = "http://a.example"\napi_key = "sk-a-0123456789abcdef"\n'
                '[[providers]]\nname = "b"\nurl = "http://b.example"\npayment = "xcashu"\n')
        engine = Engine(make_config(text))
        engine.market.adopt("a", listing(("x", 0.003, 0.003)))
        engine.market.adopt("b", listing(("x", 0.002, 0.002)))
        b = next(o for o in engine.market.catalogue.by_model["x"] if o.provider == "b")
        assert b.rates.per_request == Decimal("0.5") and b.advertised_fee == Decimal("0.001")
        assert cheapest(engine, "x") == "a"  # ~50 tokens: a few msats apart, half a sat of rounding
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi " * 5000}]}).encode()
        assert engine.decide("rid", body, None).plan.best.provider == "b"  # 5 sats apart: b

    def test_the_rounding_allowance_is_never_room_to_overcharge(self):
        from arbstr.engine import Outcome
        from arbstr.usage import UsageReport
        text = ('[wallet]\nmints = ["http://mint.example"]\n'
                '[[providers]]\nname = "b"\nurl = "http://b.example"\npayment = "xcashu"\n')
        engine = Engine(make_config(text))
        engine.market.adopt("b", listing(("x", 0.002, 0.002)))
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode()
        decision = engine.decide("rid", body, None)
        # 100 + 50 tokens at 2 msats each bill 300 msats, 1 more for the advertised 0.001-sat fee:
        # 700 is 399 over, within the half sat routing counts for rounding but an overcharge still
        record = engine.settle(decision, Outcome("b", 200, UsageReport(100, 50, 700, "", True), None,
                                                 decision.started, paid_msats=1000))
        assert record.charge_diff_msats == 700 - 301
        assert engine.track.charges("b").overcharged == 1


class TestConfigPricing:
    CONFIG = provider_toml("a", "http://a.example", ["x", "gpt-4o"], 7, 8) + 'pricing = "config"\n'

    def test_configured_prices_are_kept_whatever_the_node_says(self):
        market = Market(make_config(self.CONFIG))
        market.adopt("a", listing(("x", 0.001, 0.002), ("gpt-4o", 1, 1)))
        assert offered(market, "x") == {"a": Rates(Decimal(7), Decimal(8), Decimal(0))}
        assert offered(market, "gpt-4o") == {"a": Rates(Decimal(7), Decimal(8), Decimal(0))}
        assert market.catalogue.by_model["x"][0].context_length == 4096  # the node's limits still count

    def test_a_configured_model_the_node_does_not_serve_is_not_routed_there(self):
        market = Market(make_config(self.CONFIG))
        market.adopt("a", listing(("x", 0.001, 0.002)))
        assert market.catalogue.models() == ["x"]
        market.failed("a", "HTTP 500")
        assert market.catalogue.models() == ["gpt-4o", "x"]  # cannot tell while unreadable: as configured


class TestPriceJumps:
    def test_a_jump_over_the_limit_is_held_back(self, caplog):
        engine = Engine(live_config("a", "b"))
        engine.market.adopt("a", listing(("x", 0.001, 0.001), ("y", 0.001, 0.001)))
        engine.market.adopt("b", listing(("x", 0.005, 0.005)))
        engine.market.adopt("a", listing(("x", 0.0101, 0.001), ("y", 0.002, 0.002)))
        assert cheapest(engine, "x") == "b"  # a is set aside for x, not routed at its old price
        assert offered(engine.market, "y") == {"a": Rates(Decimal("2.000"), Decimal("2.000"))}
        status = engine.market.status(engine.config.providers[0])
        assert [h["model"] for h in status["held"]] == ["x"] and status["held"][0]["factor"] == 10.1
        assert "held back" in caplog.text and "10.1x" in caplog.text

    def test_exactly_the_limit_is_adopted_and_a_drop_counts_too(self):
        market = Market(live_config("a"))
        market.adopt("a", listing(("x", 0.001, 0.001), ("y", 0.01, 0.01)))
        market.adopt("a", listing(("x", 0.01, 0.01), ("y", 0.0009, 0.01)))
        assert list(offered(market, "x")) == ["a"]
        assert offered(market, "y") == {}

    def test_held_until_the_price_comes_back(self):
        market = Market(live_config("a"))
        market.adopt("a", listing(("x", 0.001, 0.001)))
        market.adopt("a", listing(("x", 0.1, 0.1)))
        market.adopt("a", listing(("x", 0.1, 0.1)))  # compared with the price in use, not the last one seen
        assert offered(market, "x") == {}
        market.adopt("a", listing(("x", 0.002, 0.002)))
        assert offered(market, "x") == {"a": Rates(Decimal("2.000"), Decimal("2.000"))}

    def test_a_free_model_that_starts_charging_is_held(self):
        market = Market(live_config("a"))
        market.adopt("a", listing(("x", 0, 0)))
        market.adopt("a", listing(("x", 0.001, 0)))
        assert offered(market, "x") == {}
        assert market.status(market.config.providers[0])["held"][0]["factor"] is None

    def test_the_limit_is_configurable(self):
        market = Market(live_config("a", extra="[routing]\nmax_price_jump = 2\n"))
        market.adopt("a", listing(("x", 0.001, 0.001)))
        market.adopt("a", listing(("x", 0.003, 0.001)))
        assert offered(market, "x") == {}


class TestAgainstARealNode:
    """The market reading mock nodes over real HTTP on loopback."""

    def test_routing_follows_a_price_change_within_one_refresh(self, start_provider):
        a = start_provider("a", ["x"], 0.001, 0.001)
        b = start_provider("b", ["x"], 0.002, 0.002)
        engine = Engine(make_config(*(f'[[providers]]\nname = "{p.name}"\nurl = "{p.url}"\napi_key = "sk-0123456789abcdef"\n'
                                      for p in (a, b))))
        asyncio.run(engine.market.refresh())
        assert cheapest(engine, "x") == "a"
        a.set_model(MockModel("x", 0.003, 0.003))
        asyncio.run(engine.market.refresh())
        assert cheapest(engine, "x") == "b"
        b.set_model(MockModel("x", 0.002, 0.002, enabled=False))
        b.set_model(MockModel("fresh", 0.002, 0.002))
        asyncio.run(engine.market.refresh())
        assert [o.provider for o in engine.catalogue.by_model["x"]] == ["a"]
        assert cheapest(engine, "fresh") == "b"
        assert all(r.header("authorization") == "Bearer sk-0123456789abcdef" for r in a.requests)

    def test_an_unreachable_node_is_stale_and_health_says_so(self, start_provider):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # nothing listens there once the socket is closed
        config = make_config(provider_toml("down", f"http://127.0.0.1:{port}", ["x"], 1, 2),
                             extra="[routing]\nconnect_timeout = 2\n")
        engine = Engine(config)
        asyncio.run(engine.market.refresh())
        assert engine.catalogue.by_model["x"][0].source == "fallback"
        status, payload = asyncio.run(health(engine, {}))
        prices = payload["providers"][0]["prices"]
        assert prices["stale"] and prices["source"] == "fallback" and prices["error"]
        assert payload["providers"][0]["models"] == ["x"]

    def test_local_api_shows_per_model_offers(self, start_provider):
        node = start_provider("node", ["x", "y"], 0.001, 0.002, 0.001)
        node.set_model(MockModel("y", 0.01, 0.02))
        engine = Engine(make_config(f'[[providers]]\nname = "node"\nurl = "{node.url}"\napi_key = "sk-0123456789abcdef"\n'))
        asyncio.run(engine.market.refresh())
        _, models = asyncio.run(list_models(engine, {}))
        rates = {m["id"]: m["providers"][0] for m in models["data"]}
        assert (rates["x"]["input_rate"], rates["x"]["output_rate"], rates["x"]["request_fee"]) == (1, 2, 0.001)
        assert (rates["y"]["input_rate"], rates["y"]["output_rate"], rates["y"]["source"]) == (10, 20, "live")
        _, providers = asyncio.run(list_providers(engine, {}))
        listed = providers["providers"][0]
        assert listed["pricing"] == "live" and sorted(listed["models"]) == ["x", "y"]
        assert listed["models"]["y"]["output_rate"] == 20 and "sk-0123456789abcdef" not in json.dumps(providers)
