"""`arbstr`: a thin command line over the library."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from arbstr import __version__
from arbstr.config import Config, ConfigError, load_config, mask_secret, parse_listen
from arbstr.errors import ArbstrError
from arbstr.pricing import format_sats

DEFAULT_CONFIG = "config.toml"


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

    check = commands.add_parser("check", help="validate a config file; exit 1 naming every problem")
    _config_argument(check)

    providers = commands.add_parser("providers", help="list the configured providers (keys masked)")
    _config_argument(providers)

    args = parser.parse_args(argv)
    try:
        return {"serve": cmd_serve, "check": cmd_check, "providers": cmd_providers}[args.command](args)
    except ConfigError as exc:
        _print_config_problems(exc)
        return 1
    except ArbstrError as exc:
        print(f"arbstr: {exc.message}", file=sys.stderr)
        return 1


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None,
                        help=f"config file (default: $ARBSTR_CONFIG, else ./{DEFAULT_CONFIG})")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("ARBSTR_CONFIG") or DEFAULT_CONFIG)


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
    host, port = parse_listen(args.listen or config.server.listen)
    print(f"arbstr {__version__}: {len(config.providers)} providers"
          f"{' (built-in mocks)' if fleet else ''}", file=sys.stderr, flush=True)
    try:
        asyncio.run(serve(config, host=host, port=port))
    finally:
        if fleet:
            fleet.stop()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    for warning in config.warnings():
        print(f"warning: {warning}")
    models = {m for p in config.providers for m in p.models}
    print(f"ok: {len(config.providers)} providers, {len(models)} models, "
          f"{len(config.policies.rules)} policy rules")
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    config = _load(args)
    rows = [("NAME", "URL", "MODELS", "IN/1K", "OUT/1K", "FEE", "KEY")]
    rows += [(p.name, p.url, ",".join(p.models), format_sats(p.input_rate), format_sats(p.output_rate),
              format_sats(p.base_fee), mask_secret(p.api_key)) for p in config.providers]
    print_table(rows)
    return 0


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
