"""Run mitmproxy in-process with the arbstr addon: what `arbstr serve` starts."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from mitmproxy import ctx, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from arbstr.addon import ArbstrAddon
from arbstr.config import Config

REVERSE_PLACEHOLDER = "reverse:http://127.0.0.1:1"
"""Reverse mode needs a target; arbstr rewrites every flow, so nothing ever connects to it."""


class Announce:
    """Says where the proxy really listens (port 0 picks one), once it does, for people and scripts."""

    def running(self) -> None:
        for server in ctx.master.addons.get("proxyserver").servers:
            for host, port, *_ in server.listen_addrs:
                print(f"arbstr listening at http://{host}:{port}/v1 ({server.mode.full_spec})",
                      file=sys.stderr, flush=True)


def build_master(config: Config, *, host: str, port: int, modes: Sequence[str] = (REVERSE_PLACEHOLDER,)) -> Master:
    """A mitmproxy master with only the addons a routing proxy needs, plus arbstr."""
    master = Master(options.Options(), with_termlog=True)
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True), ArbstrAddon(config), Announce(),
    )
    master.options.update(
        listen_host=host, listen_port=port, mode=list(modes),
        # Nothing may connect to the reverse placeholder before the addon has chosen a provider.
        connection_strategy="lazy",
    )
    return master


async def serve(config: Config, *, host: str, port: int, modes: Sequence[str] = (REVERSE_PLACEHOLDER,)) -> None:
    master = build_master(config, host=host, port=port, modes=modes)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()
