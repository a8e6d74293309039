"""`arbstr`: a thin command line over the library."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

from mitmproxy.exceptions import OptionsError

from arbstr import __version__, walletcli
from arbstr.budgets import budgets_from_config
from arbstr.budgets import standings as budget_standings
from arbstr.config import (Config, ConfigError, DatabaseConfig, DiscoveryConfig, ProviderConfig, file_warnings,
                           load_config, load_table, mask_secret, parse_listen)
from arbstr.configedit import add_provider, configured_names, remove_provider, write_config
from arbstr.errors import ArbstrError
from arbstr.launch import run_optimized
from arbstr.market import LiveModel, Market, ProviderPrices, provider_offers
from arbstr.pricing import format_sats
from arbstr.stats import FILTERS, GROUPS, RANGES, compute_stats, list_requests, parse_page, parse_window
from arbstr.store import Ledger, redact_url, sqlite_path

DEFAULT_CONFIG = "config.toml"
DEFAULT_CONFDIR = "~/.mitmproxy"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arbstr", description="Route OpenAI-compatible requests to the cheapest Routstr provider.")
    parser.add_argument("--version", action="version", version=f"arbstr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _config_argument(serve)
    serve.add_argument("--listen", help="host:port to listen on (default: [server] listen)")
    serve.add_argument("--mock", action="store_true",
                       help="route to built-in mock providers on loopback, with an in-memory database")
    serve.add_argument("--mock-latency", type=float, default=0.05, metavar="SECONDS",
                       help="with --mock: seconds each mock provider waits before answering (default 0.05)")
    serve.add_argument("--mode", action="append", default=[], metavar="MODE",
                       help="reverse (the default: clients use base_url), regular (clients use HTTPS_PROXY), "
                            "or any mitmproxy mode; repeat to run several, e.g. --mode reverse@8080 "
                            "--mode regular@8081")
    serve.add_argument("--log-level", metavar="LEVEL",
                       help="arbstr's own log level: debug, info, warning or error, optionally with logger=level "
                            "pairs such as peewee=debug (default: $ARBSTR_LOG, else info); "
                            "ARBSTR_LOG_FORMAT=json writes one JSON object per line")
    serve.add_argument("--confdir", default=DEFAULT_CONFDIR,
                       help=f"mitmproxy's directory for its CA certificate (default {DEFAULT_CONFDIR})")

    ca = commands.add_parser("ca", help="print the path of the CA certificate clients trust in regular mode")
    ca.add_argument("--confdir", default=DEFAULT_CONFDIR, help=f"default {DEFAULT_CONFDIR}")

    commands.add_parser("node-preload", help="print the path of the preload that makes Node clients use HTTPS_PROXY "
                                             "(node --require \"$(arbstr node-preload)\" app.js)")

    check = commands.add_parser("check", help="validate a config file; exit 1 naming every problem")
    _config_argument(check)
    check.add_argument("--live", action="store_true",
                       help="also read every provider's /v1/models and say which ones cannot be routed to, and why")

    providers = commands.add_parser("providers", help="list the configured providers and their prices per model "
                                    "(keys masked); add or remove one")
    _config_argument(providers)
    providers.add_argument("--live", action="store_true",
                           help="also read each provider's /v1/models: the prices it advertises now, next to the config's")
    edits = providers.add_subparsers(dest="action")
    add = edits.add_parser("add", help="add a [[providers]] table to the config file, leaving the rest as it is")
    _config_argument(add, nested=True)
    add.add_argument("name")
    add.add_argument("url", help="its OpenAI base URL")
    add.add_argument("--api-key", help='how to pay it: "${VARIABLE}" (best), an sk- key or a Cashu token; '
                                      "left out: ARBSTR_<NAME>_API_KEY")
    add.add_argument("--model", dest="models", action="append", default=[], metavar="MODEL",
                     help="a model it serves (repeatable; with live pricing, the fallback list)")
    add.add_argument("--pricing", choices=("live", "config"), help="where its prices come from (default live)")
    add.add_argument("--input-rate", type=Decimal, metavar="SATS", help="sats per 1000 input tokens")
    add.add_argument("--output-rate", type=Decimal, metavar="SATS", help="sats per 1000 output tokens")
    remove = edits.add_parser("remove", help="remove a provider's table (and the comment right above it)")
    _config_argument(remove, nested=True)
    remove.add_argument("name")

    discover = commands.add_parser("discover", help="find providers on Nostr relays and the Routstr directory: "
                                   "what each charges, cheapest first")
    _config_argument(discover)
    discover.add_argument("--model", help="show the providers of this model, cheapest first")
    discover.add_argument("--relay", dest="relays", action="append", metavar="URL",
                          help="a Nostr relay to ask (repeatable; default: [discovery] relays)")
    discover.add_argument("--directory", metavar="URL", help="a provider directory (default: [discovery] directory)")
    discover.add_argument("--no-directory", action="store_true", help="ask the relays only")
    discover.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                          help="for each relay and each provider (default 10)")
    discover.add_argument("--add", nargs="+", default=[], metavar="NAME",
                          help="add these providers (by the names shown) to the config file")

    stats = commands.add_parser("stats", help="what requests cost and saved, from the ledger")
    _ledger_arguments(stats)
    stats.add_argument("--group-by", choices=GROUPS, help="also show totals per provider, model, policy, app or instance_id")

    budgets = commands.add_parser("budgets", help="each budget: limit, spent, reserved, remaining, reset, alerts")
    _config_argument(budgets)
    budgets.add_argument("--db", help="database to read (default: $DATABASE_URL, else the config's [database] path)")
    budgets.add_argument("--json", action="store_true", help="print JSON for scripts (what GET /v1/budgets answers)")

    logs = commands.add_parser("logs", help="the latest requests, newest first, from the ledger")
    _ledger_arguments(logs)
    logs.add_argument("-n", "--limit", type=int, default=20, help="how many rows (default 20, at most 500)")

    walletcli.add_commands(commands, _config_argument)

    args = parser.parse_args(argv)
    if args.command == "serve" and argv is None:
        run_optimized()
    try:
        return {"serve": cmd_serve, "check": cmd_check, "providers": cmd_providers, "discover": cmd_discover,
                "stats": cmd_stats, "logs": cmd_logs, "ca": cmd_ca, "node-preload": cmd_node_preload,
                "budgets": cmd_budgets,
                "wallet": lambda a: walletcli.cmd_wallet(a, _load(a)),
                "balances": lambda a: walletcli.cmd_balances(a, _load(a))}[args.command](args)
    except ConfigError as exc:
        _print_config_problems(exc)
        return 1
    except ArbstrError as exc:
        print(f"arbstr: {exc.message}", file=sys.stderr)
        return 1


def _config_argument(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """`-c`; a nested command's copy must not reset what was given before it (`providers -c X add`)."""
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS if nested else None,
                        help=f"config file (default: $ARBSTR_CONFIG, else ./{DEFAULT_CONFIG})")


def _ledger_arguments(parser: argparse.ArgumentParser) -> None:
    _config_argument(parser)
    parser.add_argument("--db", help="database to read (default: $DATABASE_URL, else the config's [database] path)")
    parser.add_argument("--range", choices=RANGES, help="1h, 24h, 7d, 30d or all (default all)")
    parser.add_argument("--since", help="ISO 8601 start, e.g. 2026-11-23T09:00:00Z")
    parser.add_argument("--until", help="ISO 8601 end")
    for name in FILTERS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"only requests with this {name}")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _open_ledger(args: argparse.Namespace) -> Ledger:
    url = args.db or os.environ.get("DATABASE_URL") or load_table(_config_path(args), "database", DatabaseConfig).path
    path = sqlite_path(url)
    if path is not None and not os.path.exists(path):
        # Opening would create an empty database there and report nothing spent: a mistyped path
        # must not look like a quiet ledger.
        raise ArbstrError(f"no database at {path}: arbstr serve creates it with the first request it records "
                          "(pass --db PATH, or -c for the config whose [database] to read)")
    try:
        return Ledger(url)
    except Exception as exc:
        raise ArbstrError(f"cannot open the database {redact_url(url)}: {redact_url(str(exc))}") from None


def _window_params(args: argparse.Namespace) -> dict[str, str]:
    names = ("range", "since", "until", *FILTERS)
    return {name: getattr(args, name) for name in names if getattr(args, name)}


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("ARBSTR_CONFIG") or DEFAULT_CONFIG


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _print_config_problems(exc: ConfigError) -> None:
    source = exc.message.split(":", 1)[0]
    print(f"{source}: {len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from arbstr.server import serve
    if args.mock:
        from arbstr.mockfleet import MockFleet
        fleet = MockFleet(latency=args.mock_latency).start()
        config = fleet.config(listen=args.listen)
    else:
        fleet = None
        config = _load(args)
        if args.listen:
            # Where it really listens, so the default instance_id tells apart instances of one config.
            config = config.model_copy(update={"server": config.server.model_copy(update={"listen": args.listen})})
    host, port = parse_listen(args.listen or config.server.listen)
    print(f"arbstr {__version__}: {len(config.providers)} providers"
          f"{' (built-in mocks)' if fleet else ''}", file=sys.stderr, flush=True)
    try:
        asyncio.run(serve(config, host=host, port=port, modes=args.mode, confdir=args.confdir,
                          log_level=args.log_level))
    except OptionsError as exc:
        print(f"arbstr: {exc}", file=sys.stderr)
        return 1
    finally:
        if fleet:
            fleet.stop()
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from arbstr.server import ca_certificate
    print(ca_certificate(args.confdir))
    return 0


def cmd_node_preload(args: argparse.Namespace) -> int:
    print(Path(__file__).resolve().parent / "node" / "proxy-preload.cjs")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config = load_config(path)
    for warning in file_warnings(path, Path(path).read_text(encoding="utf-8")) + config.warnings():
        print(f"warning: {warning}")
    models = {m for p in config.providers for m in p.models}
    unroutable = 0
    if args.live:
        market = read_market(config)
        for provider in config.providers:
            status = market.status(provider)
            if not status["models"]:
                unroutable += 1
                print(f"providers[{provider.name}]: not routed to: {_why_no_offers(provider, status)}")
            for held in status["held"]:
                print(f"providers[{provider.name}]: {held['detail']}: held back, not routed there for that model")
    print(f"ok: {len(config.providers)} providers, {len(models)} models, "
          f"{len(config.policies.rules)} policy rules"
          + (f"; {unroutable} provider{'s' if unroutable != 1 else ''} cannot be routed to" if unroutable else ""))
    return 0


def read_market(config: Config) -> Market:
    """Every provider's prices, read once, as `serve` reads them at start."""
    market = Market(config)
    asyncio.run(market.refresh())
    return market


def _why_no_offers(provider: ProviderConfig, status: dict) -> str:
    if status["error"]:
        fallback = "and no rates are configured to fall back on" if provider.pricing == "live" \
            else "and none of its configured models can be confirmed"
        return f"its /v1/models cannot be read ({status['error']}) {fallback}"
    if status["skipped"]:
        return f"its /v1/models lists no usable price ({'; '.join(status['skipped'][:3])})"
    if provider.pricing == "config":
        return "it serves none of the models configured for it"
    return "its /v1/models lists no enabled model"


def cmd_providers(args: argparse.Namespace) -> int:
    if args.action == "add":
        fields = {"api_key": args.api_key, "models": args.models, "pricing": args.pricing,
                  "input_rate": args.input_rate, "output_rate": args.output_rate}
        return _edit_config(args, lambda text: add_provider(text, args.name, args.url, **fields),
                            f"added provider {args.name}")
    if args.action == "remove":
        return _edit_config(args, lambda text: remove_provider(text, args.name), f"removed provider {args.name}")
    config = _load(args)
    market = read_market(config) if args.live else None
    rows = [("NAME", "URL", "PRICING", "MODEL", "IN/1K", "OUT/1K", "FEE", "KEY")]
    if market:
        rows[0] += ("LIVE IN/1K", "LIVE OUT/1K", "LIVE FEE", "ROUTED")
    for provider in config.providers:
        prices = market.prices[provider.name] if market else None
        listing = prices.listing if prices and not prices.stale else None
        routed = {o.model: o for o in provider_offers(provider, 0, prices)} if prices else {}
        models = list(provider.models) + [m for m in listing or () if m not in provider.models]
        for model in models or ["-"]:
            rates = provider.configured_rates(model) if model in provider.models else None
            row = (provider.name, provider.url, provider.pricing, model,
                   *((format_sats(rates.input_per_1k), format_sats(rates.output_per_1k), format_sats(rates.per_request))
                     if rates else ("-", "-", "-")),
                   mask_secret(provider.api_key))
            if market:
                live = (listing or {}).get(model)
                row += ((format_sats(live.rates.input_per_1k), format_sats(live.rates.output_per_1k),
                         format_sats(live.advertised_fee)) if live else ("-", "-", "-"))
                row += (_routed(model, routed, prices, live),)
            rows.append(row)
    print_table(rows)
    if market:
        for provider in config.providers:
            if error := market.prices[provider.name].error:
                print(f"{provider.name}: cannot read its /v1/models: {error}")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from arbstr.discovery import discover, price_key
    path = _config_path(args)
    exists = Path(path).exists()
    settings = load_table(path, "discovery", DiscoveryConfig) if exists else DiscoveryConfig()
    directory = None if args.no_directory else args.directory or settings.directory
    taken = configured_names(Path(path).read_text(encoding="utf-8")) if exists else set()
    report = asyncio.run(discover(args.relays or settings.relays, directory, args.timeout, taken))
    reachable = [f for f in report.found if f.probe.error is None]
    if args.model:
        offering = sorted((f for f in reachable if f.probe.models.get(args.model) and f.probe.models[args.model].enabled),
                          key=lambda f: price_key(f, args.model))
        rows = [("NAME", "URL", "MINTS", "IN/1K", "OUT/1K", "REQUEST FEE", "PROBE MS")]
        for f in offering:
            live = f.probe.models[args.model]
            rows.append((f.name, f.url, ",".join(f.mints) or "-", format_sats(live.rates.input_per_1k),
                         format_sats(live.rates.output_per_1k), format_sats(live.advertised_fee), _ms(f.probe.latency_ms)))
        print_table(rows)
        print(f"{len(offering)} of {len(reachable)} reachable providers serve {args.model}")
    else:
        rows = [("NAME", "URL", "MINTS", "MODELS", "PROBE MS")]
        rows += [(f.name, f.url, ",".join(f.mints) or "-", str(sum(m.enabled for m in f.probe.models.values())),
                  _ms(f.probe.latency_ms)) for f in sorted(reachable, key=lambda f: f.name)]
        print_table(rows)
    for f in report.found:
        if f.probe.error is not None:
            print(f"unreachable: {f.name} {f.url}: {f.probe.error}")
    for source, error in report.sources:
        if error is not None:
            print(f"unreachable: {source}: {error}")
    for skipped in report.skipped:
        print(f"skipped: {skipped}")
    if args.add:
        found = {f.name: f for f in report.found}
        unknown = [name for name in args.add if name not in found]
        if unknown:
            raise ArbstrError(f"not found: {', '.join(unknown)} (found: {', '.join(sorted(found)) or 'none'})")

        def add_all(text: str) -> str:
            for name in args.add:
                text = add_provider(text, name, found[name].url)
            return text
        return _edit_config(args, add_all, f"added {', '.join(args.add)} (live pricing; set each one's api_key)")
    return 0


def _edit_config(args: argparse.Namespace, edit: Callable[[str], str], done: str) -> int:
    path = _config_path(args)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ArbstrError(f"cannot read {path}: {exc.strerror or exc}") from None
    edited = edit(text)
    write_config(path, edited)
    print(f"{path}: {done}")
    for warning in file_warnings(path, edited):
        print(f"warning: {warning}")
    return 0


def _routed(model: str, routed: dict, prices: ProviderPrices, live: LiveModel | None) -> str:
    """Whether arbstr routes `model` to this provider now, and at which price (`live`, `config`, ...)."""
    if model in prices.held:
        return "no: price jump held back"
    if model in routed:
        return routed[model].source
    if live is not None and not live.enabled:
        return "no: disabled"
    return "no: not listed" if prices.listing is not None and not prices.stale else "no"


def cmd_stats(args: argparse.Namespace) -> int:
    window = parse_window(_window_params(args), time.time())
    ledger = _open_ledger(args)
    try:
        result = ledger.call(lambda: compute_stats(window, args.group_by))
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("", "REQUESTS", "OK", "ERRORS", "STREAMS", "IN TOK", "OUT TOK", "SPENT", "SAVED/NEXT", "SAVED/MAX",
             "P50 MS", "P95 MS", "P99 MS", "OVERCHARGED")]
    groups = [("total", result["totals"])] + [(g[args.group_by] or "-", g) for g in result.get("groups", [])]
    for label, t in groups:
        latency = t["latency_ms"]
        rows.append((label, t["requests"], t["successes"], t["errors"], t["streaming"], t["input_tokens"],
                     t["output_tokens"], _people_sats(t["cost_sats"]), _people_sats(t["saved_vs_next_best_sats"]),
                     _people_sats(t["saved_vs_most_expensive_sats"]),
                     *(_ms(latency[p]) for p in ("p50", "p95", "p99")),
                     f"{t['charges']['overcharged']}/{t['charges']['checked']}"))
    print_table([tuple(map(str, row)) for row in rows])
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    budgets = budgets_from_config(_load(args))
    ledger = _open_ledger(args)
    try:
        now = time.time()
        data = [u.to_payload() for u in ledger.call(lambda: budget_standings(ledger.db, budgets, now))]
    finally:
        ledger.close()
    if args.json:
        print(json.dumps({"object": "list", "data": data}, indent=2))
        return 0
    if not data:
        print("no [[budgets]] in the config")
        return 0
    rows = [("NAME", "SCOPE", "WINDOW", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS", "ALERTS")]
    rows += [(b["name"], b["scope"] + (f" {b['match']}" if b["match"] else ""), b["window"],
              *(_people_sats(b[k]) for k in ("limit_sats", "spent_sats", "reserved_sats", "remaining_sats")),
              (b["resets_at"] or "-")[:19].replace("T", " "), ",".join(f"{t}%" for t in b["alerts"]) or "-")
             for b in data]
    print_table([tuple(map(str, row)) for row in rows])
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    window = parse_window(_window_params(args), time.time())
    limit, _ = parse_page({"limit": str(args.limit)})
    ledger = _open_ledger(args)
    try:
        page = ledger.call(lambda: list_requests(window, limit))
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(page["data"], indent=2))
        return 0
    rows = [("TIME", "POLICY", "MODEL", "PROVIDER", "IN", "OUT", "COST", "MS", "RESULT")]
    for r in page["data"]:
        result = "ok" if r["success"] else (r["error"] or f"HTTP {r['status_code']}")
        rows.append((r["timestamp"][:19].replace("T", " "), r["policy"], r["model"], r["provider"] or "-",
                     f"{r['input_tokens']}{'~' if r['usage_estimated'] else ''}", r["output_tokens"] or 0,
                     _people_sats(r["cost_sats"]) if r["cost_sats"] else "-", _ms(r["latency_ms"]),
                     result + ("" if r["attempts"] in ("", "none") else f" (after {r['attempts']})")))
    print_table([tuple(map(str, row)) for row in rows])
    print(f"{len(page['data'])} of {page['total']} requests; ~ marks estimated token counts")
    return 0


def _people_sats(text: str) -> str:
    return format_sats(Decimal(text))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
