"""Run mitmproxy in-process with the arbstr addon: what `arbstr serve` starts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import logging
import resource
import signal
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from mitmproxy import addonmanager, certs, ctx, exceptions, flow, hooks, optmanager, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, termlog, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler
from mitmproxy.proxy.mode_specs import ReverseMode

from arbstr.addon import ArbstrAddon
from arbstr.config import Config

logger = logging.getLogger(__name__)

REVERSE_PLACEHOLDER = "reverse:http://127.0.0.1:1"
"""Reverse mode needs a target; arbstr rewrites every flow, so nothing ever connects to it."""


class FreezeStartup:
    """Once the proxy runs, moves everything startup made (modules, config, addons: ~100k objects)
    out of the garbage collector's sight. mitmproxy leaves cyclic garbage behind every request, so
    full collections keep coming, and each walked all of that too: ~34 ms with the event loop
    stopped, ~5 ms once frozen (gc callbacks, timed under bench load)."""

    def running(self) -> None:
        gc.collect()
        gc.freeze()


LISTEN_BACKLOG = 4096
"""Connections the kernel queues for the proxy before it accepts them (asyncio's default is 100)."""


class DeepBacklog:
    """Lets many clients connect at once. mitmproxy listens with asyncio's backlog of 100: when more
    connect in the same instant (1,000 agents starting together) the queue overflows, and Linux
    drops handshakes or resets connections the client already believes are open. `listen()` again
    on the listening socket only changes its queue length (the kernel caps it at somaxconn)."""

    def running(self) -> None:
        for server in ctx.master.addons.get("proxyserver").servers:
            for listener in getattr(server, "_servers", ()):
                for sock in getattr(listener, "sockets", ()):
                    with sock.dup() as duplicate:  # the same socket; closing the copy leaves it listening
                        duplicate.listen(LISTEN_BACKLOG)


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


class LeanAddonManager(addonmanager.AddonManager):
    """mitmproxy's addon manager, sending each hook straight to the handlers that exist for it.

    mitmproxy's own manager walks every addon for every hook (and a second time for the `update`
    that follows each flow hook), through a generator, a coroutine and a context manager per addon,
    whether the addon handles that hook or not: about eight hook dispatches a request, most of them
    to no one, cost more than routing does (bench/proxy.py). This one looks the handlers of a hook
    up once, keeps them until an addon is added or removed, and calls them as mitmproxy does: in
    chain order, sync or async, an `AddonHalt` stops the hook, any other error is logged as
    mitmproxy logs it and the next handler runs. It is meant for `arbstr serve`'s fixed addon set;
    addons that change their `addons` children at run time (mitmproxy's script loader) need
    mitmproxy's own manager.
    """

    def __init__(self, master) -> None:
        self._handlers: dict[str, tuple] = {}
        super().__init__(master)

    # Whatever changes the chain or its children forgets the handlers found so far.
    def register(self, addon):
        try:
            return super().register(addon)
        finally:
            self._handlers.clear()

    def add(self, *addons) -> None:
        super().add(*addons)
        self._handlers.clear()

    def remove(self, addon) -> None:
        super().remove(addon)
        self._handlers.clear()

    def clear(self) -> None:
        super().clear()
        self._handlers.clear()

    def handlers(self, name: str) -> tuple:
        """The callables that handle the hook called `name`, in chain order."""
        found = self._handlers.get(name)
        if found is None:
            found = []
            for addon in addonmanager.traverse(self.chain):
                func = getattr(addon, name, None)
                if func and not isinstance(func, types.ModuleType):
                    if not callable(func):
                        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
                    found.append(func)
            found = self._handlers[name] = tuple(found)
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self.handlers(event.name)
        if not handlers:
            return
        args = event.args()
        for func in handlers:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:
                logger.error(f"Addon error: {exc}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self.handlers("update"):
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


_IMMUTABLE = frozenset({bool, int, float, str, bytes, type(None)})


class LeanOptions(options.Options):
    """mitmproxy's options, read without copying values that cannot be changed in place.

    Every read of an option (mitmproxy's HTTP layers read a dozen for each request) returns a deep
    copy of its value, so no reader can change it behind the manager's back: two `deepcopy` calls
    even for a bool or an int, which are returned as they are anyway. Those are now returned
    straight away; lists, sets and other values are still copied."""

    def __getattr__(self, attr):
        option = self._options.get(attr)
        if option is not None:
            value = option._default if option.value is optmanager.unset else option.value  # noqa: SLF001
            if type(value) in _IMMUTABLE:
                return value
        return super().__getattr__(attr)


class LeanMaster(Master):
    """A mitmproxy master whose addons are dispatched by `LeanAddonManager`; logs go to the terminal."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts)
        self.options.changed.disconnect(self.addons._configure_all)
        self.addons = LeanAddonManager(self)
        self._termlog_addon = termlog.TermLog()
        self.addons.add(self._termlog_addon)


def mitmproxy_modes(modes: Sequence[str]) -> list[str]:
    """arbstr's `--mode` values as mitmproxy mode specs: `reverse` (with an optional `@port`)
    stands for reverse mode with the placeholder target; anything else is mitmproxy's own."""
    specs = []
    for mode in modes or ["reverse"]:
        name, at, port = mode.partition("@")
        specs.append(REVERSE_PLACEHOLDER + at + port if name == "reverse" else mode)
    return specs


_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


def _hook_args(hook: hooks.Hook) -> list:
    """`Hook.args`: the hook's field values in order, the names found once per hook class (mitmproxy
    asks `dataclasses.fields` for them on every call, twice for every hook of every request)."""
    names = _HOOK_FIELDS.get(type(hook))
    if names is None:
        names = _HOOK_FIELDS[type(hook)] = tuple(field.name for field in dataclasses.fields(hook))
    return [getattr(hook, name) for name in names]


def _fork(self: Context) -> Context:
    """`Context.fork` without the throwaway `Server` its `__init__` makes (about twenty attribute
    sets through `Server.__setattr__` and a uuid4, for an object `fork` replaces at once): the same
    client, options and server, a copy of the layer list."""
    forked = object.__new__(Context)
    forked.__dict__.update(self.__dict__)
    forked.layers = self.layers.copy()
    return forked


async def _handle_hook(self: ProxyConnectionHandler, hook: commands.StartHook) -> None:
    """`ProxyConnectionHandler.handle_hook` with `TimeoutWatchdog.disarm`'s body written in (its
    generator context manager, entered and left for every hook of every request, cost more than
    the bookkeeping it wraps) and a flow that is not intercepted not awaited (`wait_for_resume`
    returns at once for it, after a coroutine made for nothing)."""
    watchdog = self.timeout_watchdog
    watchdog.can_timeout.clear()
    watchdog.blocker += 1
    try:
        (data,) = hook.args()
        await self.master.addons.handle_lifecycle(hook)
        if isinstance(data, flow.Flow) and data.intercepted:
            await data.wait_for_resume()
    finally:
        watchdog.blocker -= 1
        if watchdog.blocker == 0:
            watchdog.register_activity()
            watchdog.can_timeout.set()


def lighten_mitmproxy() -> None:
    """Three of mitmproxy's own per-request costs, for `arbstr serve`'s process only: the same
    results, computed without the work that is thrown away (tests/test_server.py holds each to
    mitmproxy's originals, so an upgrade that changes them fails there)."""
    hooks.Hook.args = _hook_args
    Context.fork = _fork
    ProxyConnectionHandler.handle_hook = _handle_hook


def build_master(config: Config, *, host: str, port: int, modes: Sequence[str] = (),
                 confdir: str | None = None, log_level: str | None = None,
                 clock: Callable[[], float] = time.time) -> Master:
    """A mitmproxy master with only the addons a routing proxy needs, plus arbstr (whose budget
    windows follow `clock`)."""
    lighten_mitmproxy()
    master = LeanMaster(LeanOptions())
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True), ArbstrAddon(config, clock, shows_flows=False),
        FreezeStartup(), DeepBacklog(), Announce(),
    )
    if confdir:
        master.options.update(confdir=confdir)
    if log_level:
        master.options.update(arbstr_log=log_level)
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
                confdir: str | None = None, log_level: str | None = None) -> None:
    raise_file_limit()
    master = build_master(config, host=host, port=port, modes=modes, confdir=confdir, log_level=log_level)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


def ca_certificate(confdir: str) -> Path:
    """The CA certificate clients must trust to be intercepted, created on first use."""
    directory = Path(confdir).expanduser()
    certs.CertStore.from_store(directory, "mitmproxy", 2048)
    return directory / "mitmproxy-ca-cert.pem"
