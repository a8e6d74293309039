"""Run mitmproxy in-process with the arbstr addon: what `arbstr serve` starts."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import certs, ctx, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy.mode_specs import ReverseMode

from arbstr.addon import ArbstrAddon
from arbstr.config import Config

REVERSE_PLACEHOLDER = "reverse:http://127.0.0.1:1"
"""Reverse mode needs a target; arbstr rewrites every flow, so nothing ever connects to it."""


class Announce:
    """Says where the proxy really listens (port 0 picks one), once it does, for people and scripts."""

    def running(self) -> None:
        for server in ctx.master.addons.get("proxyserver").servers:
            for host, port, *_ in server.listen_addrs:
                if isinstance(server.mode, ReverseMode):
                    how = f"http://{host}:{port}/v1 (reverse: use it as base_url)"
                else:
                    how = f"{host}:{port} ({server.mode.type_name}: set HTTPS_PROXY=http://{host}:{port})"
                print(f"arbstr listening at {how}", file=sys.stderr, flush=True)


def mitmproxy_modes(modes: Sequence[str]) -> list[str]:
    """arbstr's `--mode` values as mitmproxy mode specs: `reverse` (with an optional `@port`)
    stands for reverse mode with the placeholder target; anything else is mitmproxy's own."""
    specs = []
    for mode in modes or ["reverse"]:
        name, at, port = mode.partition("@")
        specs.append(REVERSE_PLACEHOLDER + at + port if name == "reverse" else mode)
    return specs


def build_master(config: Config, *, host: str, port: int, modes: Sequence[str] = (),
                 confdir: str | None = None) -> Master:
    """A mitmproxy master with only the addons a routing proxy needs, plus arbstr."""
    master = Master(options.Options(), with_termlog=True)
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True), ArbstrAddon(config), Announce(),
    )
    if confdir:
        master.options.update(confdir=confdir)
    master.options.update(
        listen_host=host, listen_port=port, mode=mitmproxy_modes(modes),
        # Nothing may connect to the reverse placeholder before the addon has chosen a provider.
        connection_strategy="lazy",
    )
    return master


def raise_file_limit() -> None:
    """Every stream holds four descriptors (client, provider, both ends of the relay): a common
    default of 1024 would cap arbstr near 250 streams, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


async def serve(config: Config, *, host: str, port: int, modes: Sequence[str] = (),
                confdir: str | None = None) -> None:
    raise_file_limit()
    master = build_master(config, host=host, port=port, modes=modes, confdir=confdir)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


def ca_certificate(confdir: str) -> Path:
    """The CA certificate clients must trust to be intercepted, created on first use."""
    directory = Path(confdir).expanduser()
    certs.CertStore.from_store(directory, "mitmproxy", 2048)
    return directory / "mitmproxy-ca-cert.pem"
