"""`arbstr wallet ...` and `arbstr balances`: a thin command line over the wallet and the nodes'
balance API. Amounts only, except `wallet send`, whose whole point is to print a token."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from arbstr.config import Config
from arbstr.errors import ArbstrError, WalletError
from arbstr.store import Ledger, redact_url


def add_commands(commands: argparse._SubParsersAction, config_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    wallet = commands.add_parser("wallet", help="the Cashu wallet that pays providers ([wallet] in the config)")
    config_argument(wallet)
    actions = wallet.add_subparsers(dest="wallet_command", required=True)
    balance = actions.add_parser("balance", help="sats per mint, and on wallet-funded keys at nodes")
    balance.add_argument("--json", action="store_true", help="print JSON for scripts")
    receive = actions.add_parser("receive", help="take a Cashu token into the wallet")
    receive.add_argument("token", help="the token, or - to read it from standard input (keeps it out of shell history)")
    send = actions.add_parser("send", help="print a token of AMOUNT sats taken from the wallet")
    send.add_argument("amount", type=int)
    topup = actions.add_parser("topup", help="a Lightning invoice from the mint; mints the sats once it is paid")
    topup.add_argument("amount", type=int)
    topup.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for the invoice to be paid (default 300; later: the next start mints it)")
    history = actions.add_parser("history", help="what came in and went out, newest first")
    history.add_argument("-n", "--limit", type=int, default=30)
    history.add_argument("--json", action="store_true", help="print JSON for scripts")
    refund = actions.add_parser("refund", help="pay wallet-funded keys at nodes back into the wallet")
    refund.add_argument("provider", nargs="?", help="only this provider's keys (default: every provider's)")

    balances = commands.add_parser("balances", help="each provider's balance at its node beside the spend recorded")
    config_argument(balances)
    balances.add_argument("--json", action="store_true", help="print JSON for scripts")


def _open(config: Config) -> tuple[Ledger, Any]:
    if config.wallet is None:
        raise ArbstrError("the config has no [wallet] section: add one naming your mint (see config.example.toml)",
                          code="no_wallet")
    from arbstr.wallet import Wallet
    try:
        ledger = Ledger(config.database.path, 0)
    except Exception as exc:
        raise ArbstrError(f"cannot open the database {redact_url(config.database.path)}: "
                          f"{redact_url(str(exc))}") from None
    try:
        return ledger, Wallet(ledger, config.wallet.mints)
    except BaseException:
        ledger.close()
        raise


def cmd_wallet(args: argparse.Namespace, config: Config) -> int:
    ledger, wallet = _open(config)
    try:
        return asyncio.run(_ACTIONS[args.wallet_command](args, config, wallet))
    finally:
        ledger.close()


async def _balance(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    from arbstr.funding import balance_info
    mints = await wallet.balance()
    keys = []
    for key in await wallet.keys():
        try:
            info = await balance_info(key.url, key.api_key)
            keys.append({"provider": key.provider, "balance_msats": info.balance_msats,
                         "reserved_msats": info.reserved_msats})
        except WalletError as exc:
            keys.append({"provider": key.provider, "balance_msats": None, "error": exc.message})
    if args.json:
        print(json.dumps({"mints": mints, "keys": keys}, indent=2))
        return 0
    from arbstr.cli import print_table
    rows = [("MINT", "SPENDABLE", "IN TOKENS OUT", "INCOMING")]
    rows += [(mint, str(b["unspent"]), str(b["reserved"]), str(b["incoming"])) for mint, b in mints.items()]
    print_table(rows)
    if keys:
        print()
        print_table([("PROVIDER", "ON KEY (SATS)")] + [
            (k["provider"], f"{k['balance_msats'] / 1000:g}" if k["balance_msats"] is not None else k["error"])
            for k in keys])
    spendable = sum(b["unspent"] for b in mints.values())
    on_keys = sum(k["balance_msats"] or 0 for k in keys) / 1000
    print(f"\ntotal: {spendable} sats in the wallet, {on_keys:g} on keys at nodes")
    return 0


async def _receive(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    token = sys.stdin.read().strip() if args.token == "-" else args.token
    got = await wallet.receive(token)
    print(f"received {got} sats")
    return 0


async def _send(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    out = await wallet.send(args.amount, "send")
    await wallet.settle(out.operation, "printed by `arbstr wallet send`")
    print(out.token)
    return 0


async def _topup(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    op, invoice = await wallet.request_topup(args.amount)
    print(f"pay this Lightning invoice for {args.amount} sats:\n{invoice}", flush=True)
    minted = await wallet.finish_topup(op, args.wait)
    if not minted:
        print("not paid yet: once it is, the next `arbstr serve` mints the sats")
        return 1
    print(f"minted {minted} sats")
    return 0


async def _history(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    events = await wallet.history(args.limit)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    from arbstr.cli import print_table
    rows = [("TIME", "KIND", "SATS", "PROVIDER", "REQUEST", "NOTE")]
    rows += [(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["timestamp"])), e["kind"], f"{e['amount_sats']:+d}",
              e["provider"] or "-", e["request_id"] or "-", e["note"]) for e in events]
    print_table(rows)
    return 0


async def _refund(args: argparse.Namespace, config: Config, wallet: Any) -> int:
    from arbstr.funding import refund_key
    keys = await wallet.keys(args.provider)
    if args.provider and args.provider not in {p.name for p in config.providers} and not keys:
        raise ArbstrError(f"no provider is named '{args.provider}' in the config", code="unknown_provider")
    total, failed = 0, 0
    for key in keys:
        try:
            got = await refund_key(wallet, key.provider, key.url, key.api_key)
        except WalletError as exc:
            print(f"{key.provider}: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        print(f"{key.provider}: {got} sats back")
        total += got
    print(f"refunded {total} sats from {len(keys) - failed} key(s)")
    return 1 if failed else 0


_ACTIONS = {"balance": _balance, "receive": _receive, "send": _send, "topup": _topup, "history": _history,
            "refund": _refund}


def cmd_balances(args: argparse.Namespace, config: Config) -> int:
    """Each provider's configured key (and wallet-funded keys) as its node sees it, beside the
    spend the ledger recorded for that provider."""
    from arbstr.funding import balance_info
    from arbstr.stats import compute_stats, parse_window
    ledger = Ledger(config.database.path, 0)
    try:
        recorded = {g["provider"]: g["cost_sats"] for g in
                    ledger.call(lambda: compute_stats(parse_window({}, time.time()), "provider")).get("groups", [])}
        wallet_keys = []
        if config.wallet is not None:
            from arbstr.wallet import Wallet
            wallet_keys = asyncio.run(Wallet(ledger, config.wallet.mints).keys())
    finally:
        ledger.close()

    async def query() -> list[dict]:
        rows = []
        keys = [(p.name, p.url, p.api_key.get_secret_value(), "config") for p in config.providers if p.api_key]
        keys += [(k.provider, k.url, k.api_key, "wallet") for k in wallet_keys]
        for provider, url, key, source in keys:
            row: dict[str, Any] = {"provider": provider, "key": source, "recorded_spend_sats": recorded.get(provider, "0")}
            try:
                info = await balance_info(url, key)
                row.update(balance_msats=info.balance_msats, reserved_msats=info.reserved_msats,
                           node_total_spent_msats=info.total_spent_msats)
            except WalletError as exc:
                row["error"] = exc.message
            rows.append(row)
        return rows
    rows = asyncio.run(query())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from arbstr.cli import print_table
    table = [("PROVIDER", "KEY", "BALANCE (SATS)", "NODE SPENT (SATS)", "RECORDED SPEND (SATS)")]
    for r in rows:
        if "error" in r:
            table.append((r["provider"], r["key"], r["error"], "-", r["recorded_spend_sats"]))
        else:
            table.append((r["provider"], r["key"], f"{r['balance_msats'] / 1000:g}",
                          f"{r['node_total_spent_msats'] / 1000:g}", r["recorded_spend_sats"]))
    print_table(table)
    return 0
