"""The lean master's hook dispatch: the same calls, in the same order, as mitmproxy's own manager."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import logging
import types
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions, hooks, options
from mitmproxy import flow as mitmproxy_flow
from mitmproxy.addons import core, proxyserver
from mitmproxy.master import Master
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy import server as mitmproxy_server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from conftest import make_config, provider_toml
from arbstr.server import (FreezeStartup, LeanAddonManager, LeanMaster, LeanOptions, _fork, _handle_hook, _hook_args,
                           build_master)


class Recorder:
    """Records each hook it receives; handles only the hooks named in `hooks`."""

    def __init__(self, name: str, calls: list, hooks=("requestheaders", "request", "response"), *,
                 halt_on: str = "", fail_on: str = "", asynchronous: bool = False, addons=()) -> None:
        self.name, self.calls, self.halt_on, self.fail_on = name, calls, halt_on, fail_on
        self.addons = list(addons)
        for hook in hooks:
            setattr(self, hook, self._async_handler(hook) if asynchronous else self._handler(hook))

    def _record(self, hook: str, args: tuple) -> None:
        self.calls.append((self.name, hook, args))
        if hook == self.halt_on:
            raise exceptions.AddonHalt()
        if hook == self.fail_on:
            raise ValueError(f"{self.name} broke on {hook}")

    def _handler(self, hook: str):
        return lambda *args: self._record(hook, args)

    def _async_handler(self, hook: str):
        async def handler(*args):
            await asyncio.sleep(0)
            self._record(hook, args)
        return handler


@contextlib.contextmanager
def running_master(master_class=LeanMaster) -> Iterator[Master]:
    """A master (create it inside a running loop); its log handler goes when the block ends, so no
    later test's log record is sent to this test's closed loop."""
    master = master_class(options.Options())
    try:
        yield master
    finally:
        master._legacy_log_events.uninstall()


def run_on(master_class, build, events) -> list:
    """Build addons with `build(calls)` on a `master_class` master (LeanMaster, or mitmproxy's own
    Master and manager), fire `events` through handle_lifecycle, and return every call the addons saw."""
    async def scenario() -> list:
        with running_master(master_class) as master:
            calls: list = []
            master.addons.add(*build(calls))
            for event in events:
                await master.addons.handle_lifecycle(event)
            return calls
    return asyncio.run(scenario())


def flow_events(flow):
    return [HttpRequestHeadersHook(flow), HttpRequestHook(flow), HttpResponseHook(flow)]


SCENARIOS = {
    "plain": lambda calls: [Recorder("a", calls), Recorder("b", calls, ("request",)), Recorder("c", calls)],
    "async": lambda calls: [Recorder("a", calls, asynchronous=True), Recorder("b", calls)],
    "halt": lambda calls: [Recorder("a", calls, halt_on="request"), Recorder("b", calls)],
    "error": lambda calls: [Recorder("a", calls, fail_on="request"), Recorder("b", calls)],
    "children": lambda calls: [Recorder("parent", calls, addons=[Recorder("child", calls)]), Recorder("b", calls)],
    "update": lambda calls: [Recorder("a", calls, ("request", "update")), Recorder("b", calls, ("update",))],
    "nobody": lambda calls: [Recorder("a", calls, ())],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dispatch_matches_mitmproxys_own_manager(scenario):
    flow = tflow.tflow()
    ours = run_on(LeanMaster, SCENARIOS[scenario], flow_events(flow))
    theirs = run_on(Master, SCENARIOS[scenario], flow_events(flow))
    assert ours == theirs
    if scenario != "nobody":
        assert ours, "the scenario must exercise some handler"


def test_calls_in_order_with_the_flow_and_update_only_when_someone_listens():
    flow = tflow.tflow()
    calls = run_on(LeanMaster, SCENARIOS["update"], [HttpRequestHook(flow)])
    assert calls == [("a", "request", (flow,)), ("a", "update", ([flow],)), ("b", "update", ([flow],))]


def test_a_halt_stops_the_hook_and_an_error_is_logged_and_skipped(caplog):
    flow = tflow.tflow()
    halted = run_on(LeanMaster, SCENARIOS["halt"], [HttpRequestHook(flow)])
    assert halted == [("a", "request", (flow,))]
    with caplog.at_level(logging.ERROR):
        failed = run_on(LeanMaster, SCENARIOS["error"], [HttpRequestHook(flow)])
    assert failed == [("a", "request", (flow,)), ("b", "request", (flow,))]
    assert "Addon error: a broke on request" in caplog.text


def test_options_errors_propagate_as_in_mitmproxy():
    class Refuses:
        def running(self):
            raise exceptions.OptionsError("bad option")

    async def scenario():
        with running_master() as master:
            master.addons.add(Refuses())
            await master.addons.trigger_event(hooks.RunningHook())

    with pytest.raises(exceptions.OptionsError, match="bad option"):
        asyncio.run(scenario())


def test_addons_added_or_removed_later_are_seen_by_the_next_hook():
    async def scenario():
        with running_master() as master:
            calls: list = []
            first = Recorder("first", calls)
            master.addons.add(first)
            flow = tflow.tflow()
            await master.addons.handle_lifecycle(HttpRequestHook(flow))
            master.addons.add(Recorder("second", calls))
            await master.addons.handle_lifecycle(HttpRequestHook(flow))
            master.addons.remove(first)
            await master.addons.handle_lifecycle(HttpRequestHook(flow))
            return [(name, hook) for name, hook, _ in calls]

    assert asyncio.run(scenario()) == [("first", "request"), ("first", "request"), ("second", "request"),
                                       ("second", "request")]


def test_a_handler_that_is_not_callable_is_an_error_as_in_mitmproxy():
    class Broken:
        request = "not a function"

    async def scenario():
        with running_master() as master:
            master.addons.add(Broken())
            master.addons.handlers("request")

    with pytest.raises(exceptions.AddonManagerError, match="not callable"):
        asyncio.run(scenario())


def test_arbstr_serve_builds_a_lean_master_with_only_the_addons_it_needs(tmp_path):
    config = make_config(provider_toml("p", "http://127.0.0.1:1/v1", ["m"], 1, 1),
                         extra=f'[database]\npath = "{tmp_path / "ledger.db"}"\n')

    async def scenario():
        master = build_master(config, host="127.0.0.1", port=0)
        master._legacy_log_events.uninstall()
        return master

    master = asyncio.run(scenario())
    assert isinstance(master.addons, LeanAddonManager)
    names = [type(addon) for addon in master.addons.chain]
    assert core.Core in names and proxyserver.Proxyserver in names
    assert len(names) <= 10, names  # mitmdump loads 34
    # The options still reach the addons: mitmproxy's own configure path runs through our manager.
    assert master.options.connection_strategy == "lazy"
    addon = master.addons.get("arbstraddon")
    assert addon.engine is not None
    addon.engine.ledger.close()
    # Every option reads as mitmproxy's manager gives it; what could be changed in place is still a copy.
    opts = master.options
    assert isinstance(opts, LeanOptions) and len(opts.keys()) > 40
    for name, option in opts.items():
        assert getattr(opts, name) == option.current(), name
        if isinstance(option.current(), (list, set, dict)):
            assert getattr(opts, name) is not getattr(opts, name), name
    opts.update(stream_large_bodies="1m", ssl_insecure=True)
    assert (opts.stream_large_bodies, opts.ssl_insecure) == ("1m", True)


def test_startup_objects_are_frozen_out_of_the_collectors_sight_once_running():
    try:
        FreezeStartup().running()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_hook_arguments_are_the_hooks_field_values_in_order():
    flow = tflow.tflow()
    for hook in (*flow_events(flow), hooks.UpdateHook([flow]), hooks.ConfigureHook({"a"})):
        assert _hook_args(hook) == [getattr(hook, field.name) for field in dataclasses.fields(hook)]


def test_a_forked_context_is_mitmproxys_fork_without_the_throwaway_server():
    client = tflow.tclient_conn()
    context = Context(client, options.Options())
    context.server = tflow.tserver_conn()
    context.layers = ["a", "b"]
    forked = _fork(context)
    # The attributes a new Context has, no more and no fewer: an upgrade that adds one fails here.
    assert set(vars(forked)) == set(vars(Context(client, options.Options())))
    assert forked.client is client and forked.options is context.options and forked.server is context.server
    assert forked.layers == ["a", "b"] and forked.layers is not context.layers
    forked.layers.append("c")
    assert context.layers == ["a", "b"]


def _mitmproxy_function(module, qualified_name: str):
    """The source of one of mitmproxy's functions as its file has it (whatever patched the class
    since), and the function that source defines."""
    tree = ast.parse(inspect.getsource(module))
    *classes, name = qualified_name.split(".")
    body = tree.body
    for class_name in classes:
        body = next(node for node in body if isinstance(node, ast.ClassDef) and node.name == class_name).body
    node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name)
    node.decorator_list = []
    namespace = dict(vars(module))
    exec(compile(ast.Module([node], []), module.__file__, "exec"), namespace)  # noqa: S102 - mitmproxy's own code
    return hashlib.sha256(ast.unparse(node).encode()).hexdigest()[:16], namespace[name]


def test_the_hook_handler_patch_was_written_against_these_mitmproxy_functions():
    # _handle_hook writes these in: an upgrade that changes any of them fails here, to be looked at again.
    found = {name: _mitmproxy_function(module, name)[0] for module, name in (
        (mode_servers, "ProxyConnectionHandler.handle_hook"), (mitmproxy_server, "TimeoutWatchdog.disarm"),
        (mitmproxy_flow, "Flow.wait_for_resume"))}
    assert found == {"ProxyConnectionHandler.handle_hook": HANDLE_HOOK_SOURCE,
                     "TimeoutWatchdog.disarm": DISARM_SOURCE, "Flow.wait_for_resume": WAIT_FOR_RESUME_SOURCE}


# sha256 of each function's source as mitmproxy 12.3 has it (ast.unparse: formatting and comments aside).
HANDLE_HOOK_SOURCE = "98350a24f7927bca"
DISARM_SOURCE = "02ea47e3aa63777e"
WAIT_FOR_RESUME_SOURCE = "c33f7f02fd82f36f"


@pytest.mark.parametrize("intercepted", [False, True])
def test_hooks_are_handled_as_mitmproxys_handler_handles_them(intercepted):
    _, original = _mitmproxy_function(mode_servers, "ProxyConnectionHandler.handle_hook")

    async def run(handle_hook) -> list[tuple]:
        seen: list[tuple] = []
        watchdog = mitmproxy_server.TimeoutWatchdog(60, lambda: None)
        watchdog.last_activity = 0.0
        flow = tflow.tflow()

        class Addons:
            async def handle_lifecycle(self, hook) -> None:
                seen.append(("in hook", watchdog.can_timeout.is_set(), watchdog.blocker, watchdog.last_activity))
                if intercepted:
                    flow.intercept()
                    asyncio.get_running_loop().call_later(0.05, flow.resume)

        handler = types.SimpleNamespace(timeout_watchdog=watchdog, master=types.SimpleNamespace(addons=Addons()))
        await handle_hook(handler, HttpRequestHook(flow))
        seen.append(("after", watchdog.can_timeout.is_set(), watchdog.blocker, watchdog.last_activity > 0,
                     flow.intercepted))
        return seen

    expected = asyncio.run(run(original))
    assert asyncio.run(run(_handle_hook)) == expected
    assert expected == [("in hook", False, 1, 0.0), ("after", True, 0, True, False)]
