"""What the proxy costs a client: arbstr against bare mitmproxy and against no proxy at all.

One run starts a fake Routstr provider (`arbstr.mock.MockProvider`, in its own process) and
measures, for each target in turn:

  direct          the client straight to the fake provider
  mitmdump        bare `mitmdump --mode reverse:...` (no arbstr) in front of the same provider
  mitmdump-O      the same mitmdump run by `python -O`, as `arbstr serve` runs itself: what -O alone gives
  arbstr          `arbstr serve` routing to it (routing, x-arbstr-* headers, SQLite ledger on)
  mitmdump+addon  `mitmdump -s addons/arbstr.py` with the same config (mitmproxy's full tool set)
  arbstr@REV      `--baseline REV`: the same `arbstr serve` from the arbstr package of git revision REV
                  (exported with `git archive`, run by this venv's Python), so a change is weighed
                  against what it replaced on the same machine in the same minute
  portkey         Portkey's AI gateway (Node, what `npx @portkey-ai/gateway` runs), told by the
                  x-portkey-provider and x-portkey-custom-host headers, which only it is sent, to
                  forward to the same provider as OpenAI

Columns: req/s with 16 keep-alive connections (non-streaming POST /v1/chat/completions), p50, p99
and max latency of sequential requests on one connection (max shows pauses such as a full garbage
collection, which a second of requests usually meets once), p50 time to the first body byte of a
`"stream": true` request (the provider pauses between chunks, so a buffering proxy would show
it), the median gap between a stream's content events as the client sees them (the provider
sends them STREAM_CHUNK_DELAY apart: a proxy that keeps the pacing shows that, a buffering one
~0), peak RSS of the proxy process (VmHWM), and errors. A second table says where the CPU went
during the req/s run: the load generator (this process), the provider and the proxy, in % of one
core; a load generator near 100% means that row is a lower bound.

`--soak` instead holds N slow streams open at once through arbstr (default 1000 streams of 30 s,
one chunk a second; `--only` picks other proxies) and reports how many ended correctly with
`data: [DONE]`, what went wrong with the others, what the proxy logged and recorded, and its
peak RSS and open file descriptors. Each stream costs arbstr four descriptors (client, provider,
and both ends of its internal stream relay), so `--proxy-fd-limit 1024` shows what a common
default limit does to it.

The load generator is a small asyncio HTTP/1.1 client (keep-alive, Content-Length and chunked
bodies) in this process; the provider and each proxy run in processes of their own, so none
shares a GIL. Everything listens on 127.0.0.1 on ports the OS picks, and every process and temp
directory is gone when the script ends.

The gateway is `npm install`ed once, pinned, into bench/.cache/portkey (`--with-portkey` does it,
the only step that needs the network) and then run straight from there with `node`, so its RSS
and CPU are the server's own, not an npx wrapper's. A normal run measures it only if it is already
there; if it cannot be installed or started, one line says why and the run goes on without it.

Run:
  .venv/bin/python bench/proxy.py                      # about 1.5 minutes on 2 cores
  .venv/bin/python bench/proxy.py --quick --only arbstr,mitmdump
  .venv/bin/python bench/proxy.py --quick --only mitmdump,arbstr --baseline 1847435 --rounds 5
  .venv/bin/python bench/proxy.py --with-portkey       # npm installs the gateway once if needed
  .venv/bin/python bench/proxy.py --soak [--soak-streams 1000] [--soak-seconds 30] [--only mitmdump,arbstr]
  .venv/bin/python bench/proxy.py --soak --proxy-fd-limit 1024   # the proxy under a common default limit
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from arbstr import http1

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS = ("direct", "mitmdump", "mitmdump-O", "arbstr", "mitmdump+addon", "portkey")
ARBSTR_TARGETS = frozenset({"arbstr", "mitmdump+addon"})
BASELINE_PREFIX = "arbstr@"
"""Target name of `--baseline REV`: `arbstr serve` from the code of another git revision."""
LISTENING = re.compile(r"listening at (?:http://)?([0-9.]+):(\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

MODEL = "bench-model"
PROVIDER = "bench"
UPSTREAM_KEY = "sk-bench-upstream-0123456789abcdef"
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
PROMPT = "Say hello to the benchmark"
STREAM_REPLY = "one two three four five"
STREAM_CHUNK_DELAY = 0.02
"""Seconds the provider waits between chunks in the TTFB run: a stream lasts about 80 ms."""
SOAK_CHUNK_DELAY = 1.0
SOAK_RAMP_SECONDS = 1.0
"""The soak's streams are opened evenly over this long, not in one burst."""
WARMUP_REQUESTS = 20
REQUEST_TIMEOUT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
NPM_TIMEOUT = 300.0

PORTKEY_DIR = ROOT / "bench" / ".cache" / "portkey"
PORTKEY_SERVER = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
PORTKEY_MANIFEST = json.dumps({
    "private": True,
    "dependencies": {"@portkey-ai/gateway": "1.15.2"},
    # From 1.14.2 on, @hono/node-server's Response keeps the provider's immutable fetch headers, so
    # the gateway answers every `"stream": true` request with 500 "TypeError: immutable" (Portkey-AI/
    # gateway issue 1389). 1.14.1 is the newest that streams; the gateway asks for ^1.3.3.
    "overrides": {"@hono/node-server": "1.14.1"},
}, indent=2) + "\n"
"""package.json of PORTKEY_DIR: what `npm install` puts there, and how to tell it is already done."""
PORTKEY_PRELOAD = """\
// The gateway listens on all interfaces at --port=N (default 8787). This makes it listen on
// 127.0.0.1 at a port the OS picks and log that port, as the other proxies do.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  this.once("listening", () => console.log(`listening at ${this.address().address}:${this.address().port}`));
  return listen.call(this, { host: "127.0.0.1", port: 0 }, ...args.filter((arg) => typeof arg === "function"));
};
"""
PORTKEY_ERROR = re.compile(r"^(?:\w+ error: |Error |Unhandled (?:exception|rejection))")
"""How the gateway logs a failed request (it answers 500 "Something went wrong")."""


# -- the load generator --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    started: float
    first_byte: float | None
    """When the first body byte (for chunked bodies: the first chunk) had arrived."""
    ended: float
    event_times: tuple[float, ...] = ()
    """When each SSE event (its closing blank line) had arrived."""


class HttpConnection:
    """One keep-alive HTTP/1.1 client connection, framed by arbstr's codec (arbstr.http1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = http1.MessageReader(reader)
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> Response:
        """Send one request and read its whole response (the server must answer in order)."""
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.messages.response_head()
        first_byte = None
        event_times: list[float] = []
        parts: list[bytes] = []
        while (data := await self.messages.body_data()) is not None:
            now = time.perf_counter()
            first_byte = first_byte or now
            # An event ends at a blank line, which may straddle two pieces.
            ends = (parts[-1][-1:] if parts else b"") + data
            parts.append(data)
            event_times += [now] * ends.count(b"\n\n")
        body = b"".join(parts)
        if not head.keep_alive or head.body_size == -1:
            self.close()
        if head.body_size is not None and first_byte is not None:  # not chunked: every event arrived at once
            event_times = [first_byte] * body.count(b"\n\n")
        return Response(head.status, body, started, first_byte, time.perf_counter(), tuple(event_times))

    def close(self) -> None:
        self.closed = True
        self.writer.close()


CLIENT_ERRORS = (OSError, http1.Http1Error, ValueError)
"""What a broken connection, a malformed answer or a timeout (an OSError) raises in HttpConnection."""


def chat_request(port: int, headers: Mapping[str, str], *, stream: bool) -> bytes:
    payload: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        payload["stream"] = True
    body = json.dumps(payload).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def target_headers(target: str, upstream_port: int) -> dict[str, str]:
    """Request headers only this target is sent: where Portkey's gateway is to forward to."""
    if target == "portkey":
        return {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/v1"}
    return {}


def stream_complete(response: Response) -> bool:
    return response.status == 200 and response.body.endswith(b"data: [DONE]\n\n")


# -- reading other processes ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise KeyError("Max open files")


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 1000 streams need more than 1024 descriptors.

    Called first thing in this process; every process started later inherits it.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


# -- the processes under test --------------------------------------------------------------------


def _serve_upstream(control: multiprocessing.connection.Connection, chunk_delay: float, reply: str) -> None:
    """Child process: a MockProvider until the parent says stop (or goes away)."""
    from arbstr.mock import MockModel, MockProvider

    provider = MockProvider(PROVIDER, [MockModel(MODEL, 0.001, 0.002)], chunk_delay=chunk_delay, reply=reply).start()
    control.send(provider.port)
    try:
        while not control.poll(1.0):
            provider.clear_requests()  # it keeps every request for tests; here that would only grow
    finally:
        provider.stop()


@contextmanager
def upstream(chunk_delay: float, reply: str) -> Iterator[tuple[int, int]]:
    """A fake Routstr provider in its own process: yields (port, pid)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_upstream, args=(child, chunk_delay, reply), name="bench-upstream")
    process.start()
    try:
        if parent not in multiprocessing.connection.wait([parent, process.sentinel], START_TIMEOUT):
            raise RuntimeError(f"the fake provider did not start (exit code {process.exitcode})")
        yield parent.recv(), process.pid
    finally:
        if process.is_alive():
            parent.send("stop")
            process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()


def arbstr_config(upstream_port: int, database: Path) -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\n\n'
            f"[database]\npath = {json.dumps(str(database))}\n\n"
            f"[routing]\nhealth_interval = 0\n\n"
            f'[[providers]]\nname = "{PROVIDER}"\nurl = "http://127.0.0.1:{upstream_port}/v1"\n'
            f'api_key = "{UPSTREAM_KEY}"\nmodels = ["{MODEL}"]\ninput_rate = 1\noutput_rate = 2\n')


def one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


def portkey_installed() -> bool:
    manifest = PORTKEY_DIR / "package.json"
    return PORTKEY_SERVER.is_file() and manifest.is_file() and manifest.read_text() == PORTKEY_MANIFEST


def install_portkey() -> None:
    """`npm install` PORTKEY_MANIFEST into PORTKEY_DIR: the one step that needs the network."""
    PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
    manifest = PORTKEY_DIR / "package.json"
    manifest.write_text(PORTKEY_MANIFEST)
    # --ignore-scripts: the gateway's only install script is patch-package, and it ships no patches.
    command = ["npm", "install", "--prefix", str(PORTKEY_DIR), "--ignore-scripts", "--no-audit", "--no-fund",
               "--loglevel=error"]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=NPM_TIMEOUT)
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode or not PORTKEY_SERVER.is_file():
        manifest.unlink()
        reason = (f"took over {NPM_TIMEOUT:g} s" if done is None
                  else f"exited with {done.returncode}: {one_line(done.stderr or done.stdout)}")
        raise RuntimeError(f"`{' '.join(command)}` {reason}")


def portkey_unavailable(install: bool) -> str | None:
    """Why the gateway cannot be measured, or None when it is in PORTKEY_DIR (installed now if `install`)."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if portkey_installed():
        return None
    where = PORTKEY_DIR.relative_to(ROOT)
    if not install:
        return f"not installed in {where} (--with-portkey installs it)"
    print(f"installing Portkey's gateway into {where} ...", flush=True)
    try:
        install_portkey()
    except (RuntimeError, OSError) as exc:
        return f"could not be installed: {exc}"
    return None


def portkey_versions() -> str:
    def version(package: str) -> str:
        return json.loads((PORTKEY_DIR / "node_modules" / package / "package.json").read_text())["version"]

    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return f"node {node}, @portkey-ai/gateway {version('@portkey-ai/gateway')} on @hono/node-server " \
           f"{version('@hono/node-server')}"


def is_arbstr(target: str) -> bool:
    return target in ARBSTR_TARGETS or target.startswith(BASELINE_PREFIX)


def export_revision(revision: str, into: Path) -> Path:
    """The arbstr package of git revision REVISION, written under INTO; returns the directory to
    put on PYTHONPATH. Raises RuntimeError when git cannot export it."""
    source = into / f"src-{revision}"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision, "arbstr"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {revision}: {one_line(archive.stderr.decode(errors='replace'))}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    return source


def proxy_command(target: str, upstream_port: int, workdir: Path) -> list[str]:
    # `--set flow_detail=0` is what -q does to mitmdump's per-flow output; unlike -q it keeps the
    # info log that says which port was picked. `arbstr serve` has no flow dumper at all.
    config = workdir / "config.toml"
    if target in ("mitmdump", "mitmdump-O"):
        # mitmdump-O: the same under `python -O`, which arbstr serve uses; it shows what -O alone is worth.
        python = [sys.executable, "-O"] if target == "mitmdump-O" else []
        return [*python, str(BIN / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
                "--listen-host", "127.0.0.1", "-p", "0", "--set", "flow_detail=0"]
    if target == "arbstr":
        return [str(BIN / "arbstr"), "serve", "-c", str(config), "--listen", "127.0.0.1:0"]
    if target.startswith(BASELINE_PREFIX):
        # What `arbstr serve` execs itself into; PYTHONPATH (proxy_env) puts the old package first.
        return [sys.executable, "-O", "-m", "arbstr.cli", "serve", "-c", str(config), "--listen", "127.0.0.1:0"]
    if target == "mitmdump+addon":
        return [str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "arbstr.py"),
                "--mode", "reverse:http://127.0.0.1:1", "--set", "connection_strategy=lazy",
                "--set", f"arbstr_config={config}", "--listen-host", "127.0.0.1", "-p", "0",
                "--set", "flow_detail=0"]
    if target == "portkey":
        # --headless: no web UI and no log stream for it.
        return ["node", "--require", str(workdir / "listen.cjs"), str(PORTKEY_SERVER), "--headless"]
    raise ValueError(target)


class ProxyProcess:
    """A proxy subprocess on a port the OS picked, read from its "listening at" log line."""

    def __init__(self, command: Sequence[str], workdir: Path, nofile: int | None,
                 env: Mapping[str, str] | None = None) -> None:
        self.log_path = workdir / "proxy.log"
        limit = None
        if nofile is not None:
            limit = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE,
                                      (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, preexec_fn=limit,
                                            env=None if env is None else {**os.environ, **env})
        self.pid = self.process.pid
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if match := LISTENING.search(self.log()):
                return int(match.group(2))
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"did not start listening within {START_TIMEOUT:g} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (arbstr then writes every ledger row), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_proxy(target: str, upstream_port: int, workdir: Path, nofile: int | None,
                  sources: Mapping[str, Path] | None = None) -> Iterator[ProxyProcess]:
    workdir.mkdir()
    (workdir / "config.toml").write_text(arbstr_config(upstream_port, workdir / "bench.db"))
    if target == "portkey":
        (workdir / "listen.cjs").write_text(PORTKEY_PRELOAD)
    env = {"PYTHONPATH": str(sources[target])} if sources and target in sources else None
    proxy = ProxyProcess(proxy_command(target, upstream_port, workdir), workdir, nofile, env)
    try:
        yield proxy
    finally:
        proxy.stop()


@dataclass(frozen=True)
class LedgerSummary:
    rows: int
    successes: int
    errors: dict[str, int]

    def describe(self) -> str:
        failed = "; ".join(f"{count}x {error}" for error, count in self.errors.items())
        return f"{self.rows} rows, {self.successes} successful" + (f"; failed: {failed}" if failed else "")


def read_ledger(database: Path) -> LedgerSummary:
    """What arbstr recorded (read after it stopped, when every row is written)."""
    if not database.exists():
        return LedgerSummary(0, 0, {})
    with sqlite3.connect(database) as db:
        rows, successes = db.execute("SELECT count(*), coalesce(sum(success), 0) FROM requests").fetchone()
        errors = dict(db.execute("SELECT coalesce(error, 'status ' || status_code), count(*) FROM requests "
                                 "WHERE NOT success GROUP BY 1 ORDER BY 2 DESC"))
    return LedgerSummary(rows, successes, errors)


def log_findings(log: str) -> list[str]:
    """Lines of a proxy log worth a reader's attention: running out of descriptors, crashes, failed requests."""
    lines = log.splitlines()
    findings = []
    if emfile := [line for line in lines if "Too many open files" in line]:
        findings.append(f"{len(emfile)} log lines say 'Too many open files', first: {emfile[0].strip()[:160]}")
    exceptions = Counter(next((later.strip() for later in lines[i + 1:] if later and not later[0].isspace()), "?")
                         for i, line in enumerate(lines) if line.lstrip().startswith("Traceback"))
    findings += [f"{count} tracebacks in the proxy log ending in: {exception[:200]}"
                 for exception, count in exceptions.most_common()]
    errors = Counter(line.strip()[:200] for line in lines if PORTKEY_ERROR.match(line))
    findings += [f"{count} error lines in the proxy log: {error}" for error, count in errors.most_common()]
    return findings


# -- measurements ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rps: float
    sent: int
    errors: int
    cpu_percent: dict[str, float]
    """CPU used during the measured window per process, in % of one core."""


async def measure_throughput(port: int, headers: Mapping[str, str], connections: int, warmup: float,
                             duration: float, pids: dict[str, int]) -> Load:
    """Requests per second over `duration`, after `warmup`, with `connections` keep-alive connections."""
    request = chat_request(port, headers, stream=False)
    ok = failed = 0
    running = True

    async def worker() -> None:
        nonlocal ok, failed
        connection: HttpConnection | None = None
        while running:
            try:
                if connection is None or connection.closed:
                    connection = await HttpConnection.open(port)
                response = await connection.exchange(request)
            except CLIENT_ERRORS:
                failed += 1
                if connection is not None:
                    connection.close()
                connection = None
                await asyncio.sleep(0.01)
                continue
            if response.status == 200:
                ok += 1
            else:
                failed += 1
        if connection is not None:
            connection.close()

    def cpu() -> dict[str, float]:
        return {"client": time.process_time(), **{name: cpu_seconds(pid) for name, pid in pids.items()}}

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(warmup)
    ok_before, cpu_before, started = ok, cpu(), time.perf_counter()
    await asyncio.sleep(duration)
    ok_after, cpu_after, ended = ok, cpu(), time.perf_counter()
    running = False
    _, stuck = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT)
    for task in stuck:
        task.cancel()
    elapsed = ended - started
    return Load((ok_after - ok_before) / elapsed, ok + failed + len(stuck), failed + len(stuck),
                {name: (cpu_after[name] - cpu_before[name]) / elapsed * 100 for name in cpu_before})


@dataclass
class Sequential:
    total_ms: list[float] = field(default_factory=list)
    """Request sent to last body byte read, per measured request."""
    ttfb_ms: list[float] = field(default_factory=list)
    """Request sent to first body byte read."""
    gaps_ms: list[float] = field(default_factory=list)
    """Streams: time between consecutive content events, which the provider sends STREAM_CHUNK_DELAY apart."""
    sent: int = 0
    errors: int = 0


async def measure_sequential(port: int, headers: Mapping[str, str], count: int, *, stream: bool) -> Sequential:
    """`count` requests one after another on one keep-alive connection, after a few unmeasured ones."""
    request = chat_request(port, headers, stream=stream)
    result = Sequential()
    connection: HttpConnection | None = None
    for i in range(WARMUP_REQUESTS + count):
        result.sent += 1
        try:
            if connection is None or connection.closed:
                connection = await HttpConnection.open(port)
            async with asyncio.timeout(REQUEST_TIMEOUT):
                response = await connection.exchange(request)
        except CLIENT_ERRORS:
            result.errors += 1
            if connection is not None:
                connection.close()
            connection = None
            continue
        if not (stream_complete(response) if stream else response.status == 200):
            result.errors += 1
        elif i >= WARMUP_REQUESTS:
            result.total_ms.append((response.ended - response.started) * 1000)
            result.ttfb_ms.append(((response.first_byte or response.ended) - response.started) * 1000)
            paced = response.event_times[:len(STREAM_REPLY.split())]  # one event per word, then the end
            result.gaps_ms += [(b - a) * 1000 for a, b in zip(paced, paced[1:])]
    if connection is not None:
        connection.close()
    return result


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Row:
    target: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    ttfb_ms: float | None = None
    gap_ms: float | None = None
    rss_mb: float | None = None
    errors: int = 0
    cpu_percent: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


async def check_target(port: int, target: str, headers: Mapping[str, str]) -> None:
    """One request first: the target answers, and arbstr targets really routed it."""
    connection = await HttpConnection.open(port)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await connection.exchange(chat_request(port, headers, stream=False))
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"answered {response.status}: {response.body[:300]!r}")
    if is_arbstr(target) and b'"arbstr_provider"' not in response.body:
        raise RuntimeError(f"the answer was not routed by arbstr: {response.body[:300]!r}")


async def measure_all(port: int, target: str, headers: Mapping[str, str], args: argparse.Namespace,
                      pids: dict[str, int]) -> tuple[Row, int]:
    """Every measurement of one target; returns the row and how many requests were sent."""
    await check_target(port, target, headers)
    load = await measure_throughput(port, headers, args.connections, args.warmup, args.duration, pids)
    latency = await measure_sequential(port, headers, args.requests, stream=False)
    streams = await measure_sequential(port, headers, args.streams, stream=True)
    row = Row(target, load.rps, percentile(latency.total_ms, 50), percentile(latency.total_ms, 99),
              max(latency.total_ms, default=None), percentile(streams.ttfb_ms, 50), percentile(streams.gaps_ms, 50), errors=load.errors + latency.errors + streams.errors,
              cpu_percent=load.cpu_percent)
    if streams.ttfb_ms and row.ttfb_ms > percentile(streams.total_ms, 50) / 2:
        row.notes.append(f"streams look buffered: first byte after {row.ttfb_ms:.1f} ms of a "
                         f"{percentile(streams.total_ms, 50):.1f} ms stream")
    for process, role in (("client", "the load generator"), ("upstream", "the fake provider")):
        if load.cpu_percent[process] > 90:
            row.notes.append(f"{role} used {load.cpu_percent[process]:.0f}% of a core: req/s is bounded by it")
    return row, 1 + load.sent + latency.sent + streams.sent


def measure_target(target: str, upstream_port: int, upstream_pid: int, tmp: Path,
                   args: argparse.Namespace, sources: Mapping[str, Path], round_: int = 0) -> Row:
    pids = {"upstream": upstream_pid}
    headers = target_headers(target, upstream_port)
    if target == "direct":
        return asyncio.run(measure_all(upstream_port, target, headers, args, pids))[0]
    workdir = tmp / f"{target.replace('+', '-').replace('@', '-')}-{round_}"
    with running_proxy(target, upstream_port, workdir, args.proxy_fd_limit, sources) as proxy:
        row, sent = asyncio.run(measure_all(proxy.port, target, headers, args, pids | {"proxy": proxy.pid}))
        row.rss_mb = proc_status_kb(proxy.pid, "VmHWM") / 1024
    row.notes += log_findings(proxy.log())
    if is_arbstr(target):
        row.notes.append(f"ledger: {read_ledger(workdir / 'bench.db').describe()} for {sent} requests sent")
    return row


# -- soak -----------------------------------------------------------------------------------------


@dataclass
class Soak:
    streams: int
    outcomes: Counter[str] = field(default_factory=Counter)
    ttfbs_ms: list[float] = field(default_factory=list)
    durations_s: list[float] = field(default_factory=list)
    peak_fds: int = 0
    proxy_gone: str = ""


def describe_failure(response: Response, last_word: bytes) -> str | None:
    """None for a stream that ended correctly, else what was wrong with it."""
    if response.status != 200:
        try:
            error = json.loads(response.body)["error"]
            reason = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            reason = response.body.decode(errors="replace")
        return f"HTTP {response.status} {reason[:160]}"
    if not response.body.endswith(b"data: [DONE]\n\n"):
        return "stream ended without data: [DONE]"
    if last_word not in response.body:
        return "stream lost chunks"
    return None


async def soak_streams(port: int, headers: Mapping[str, str], streams: int, words: int, deadline: float,
                       proxy_pid: int) -> Soak:
    """`streams` streams opened over SOAK_RAMP_SECONDS and held until they end."""
    request = chat_request(port, headers, stream=True)
    last_word = b'"content": "w%d ' % (words - 1)
    result = Soak(streams)

    async def one(index: int) -> None:
        await asyncio.sleep(SOAK_RAMP_SECONDS * index / streams)
        connection: HttpConnection | None = None
        try:
            async with asyncio.timeout(deadline):
                connection = await HttpConnection.open(port)
                response = await connection.exchange(request)
        except TimeoutError:
            result.outcomes[f"no end within {deadline:g} s"] += 1
            return
        except OSError as exc:
            result.outcomes[f"connection error: {exc.strerror or exc}"] += 1
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            result.outcomes[f"broken response: {type(exc).__name__}"] += 1
            return
        finally:
            if connection is not None:
                connection.close()
        failure = describe_failure(response, last_word)
        result.outcomes[failure or "ok"] += 1
        if failure is None:
            result.ttfbs_ms.append((response.first_byte - response.started) * 1000)
            result.durations_s.append(response.ended - response.started)

    async def watch() -> None:
        while True:
            try:
                result.peak_fds = max(result.peak_fds, open_fds(proxy_pid))
            except OSError:
                result.proxy_gone = "the proxy process went away during the soak"
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(one(i) for i in range(streams)))
    watcher.cancel()
    return result


def run_soak(args: argparse.Namespace) -> None:
    words = max(1, round(args.soak_seconds / SOAK_CHUNK_DELAY)) + 1
    reply = " ".join(f"w{i}" for i in range(words))
    deadline = args.soak_seconds + 60
    print(f"soak: {args.soak_streams} concurrent streams of {words} chunks, {SOAK_CHUNK_DELAY:g} s apart "
          f"(~{(words - 1) * SOAK_CHUNK_DELAY:g} s each), opened over {SOAK_RAMP_SECONDS:g} s\n")
    rows = [("TARGET", "STREAMS", "OK", "FAILED", "TTFB P50 MS", "TTFB P99 MS", "SLOWEST S", "PEAK FDS",
             "FD LIMIT", "PEAK RSS MB", "PROXY CPU S")]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="arbstr-bench-") as tmp, \
            upstream(SOAK_CHUNK_DELAY, reply) as (upstream_port, _):
        for target in args.only:
            workdir = Path(tmp) / target.replace("+", "-")
            with running_proxy(target, upstream_port, workdir, args.proxy_fd_limit) as proxy:
                limit = fd_limit(proxy.pid)
                soak = asyncio.run(soak_streams(proxy.port, target_headers(target, upstream_port), args.soak_streams,
                                                words, deadline, proxy.pid))
                rss_mb = proc_status_kb(proxy.pid, "VmHWM") / 1024
                cpu = cpu_seconds(proxy.pid)
            ok = soak.outcomes.pop("ok", 0)
            rows.append((target, soak.streams, ok, sum(soak.outcomes.values()), _num(percentile(soak.ttfbs_ms, 50)),
                         _num(percentile(soak.ttfbs_ms, 99)), _num(max(soak.durations_s, default=None)),
                         soak.peak_fds, limit, _num(rss_mb), _num(cpu)))
            notes += [f"{target}: {count} streams: {outcome}" for outcome, count in soak.outcomes.most_common()]
            notes += [f"{target}: {finding}" for finding in [soak.proxy_gone, *log_findings(proxy.log())] if finding]
            if target in ARBSTR_TARGETS:
                notes.append(f"{target}: ledger: {read_ledger(workdir / 'bench.db').describe()}")
    print_table(rows)
    for note in notes:
        print(f"  - {note}")


# -- output ---------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))).rstrip())


def print_machine(targets: Sequence[str]) -> None:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "unknown CPU")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model}, "
          f"Linux {platform.release()}")
    print(f"python {platform.python_version()}, mitmproxy {importlib.metadata.version('mitmproxy')}, "
          f"arbstr {importlib.metadata.version('arbstr')}, httpx {importlib.metadata.version('httpx')}; "
          f"open files limit {soft}/{hard} (soft/hard)")
    if "portkey" in targets:
        print(portkey_versions())
    print()


def cpu_per_request(row: Row) -> float | None:
    """The proxy's CPU per request of the req/s run, in core-seconds per thousand requests."""
    if not row.rps or "proxy" not in row.cpu_percent:
        return None
    return row.cpu_percent["proxy"] / 100 / row.rps * 1000


def median_rows(rows: Sequence[Row]) -> dict[str, Row]:
    """One row per measured target: itself, or with --rounds the per-column medians of its rounds."""
    by_target: dict[str, list[Row]] = {}
    for row in rows:
        if row.rps is not None:
            by_target.setdefault(row.target, []).append(row)

    def median(values: list[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    return {target: Row(target, *(median([getattr(r, name) for r in runs]) for name in
                                  ("rps", "p50_ms", "p99_ms", "max_ms", "ttfb_ms", "gap_ms", "rss_mb")),
                        errors=sum(r.errors for r in runs),
                        cpu_percent={name: statistics.median(r.cpu_percent[name] for r in runs)
                                     for name in runs[0].cpu_percent})
            for target, runs in by_target.items()}


def print_results(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"{args.connections} connections for {args.duration:g} s after {args.warmup:g} s; latency over "
          f"{args.requests} sequential requests; TTFB over {args.streams} streams "
          f"({len(STREAM_REPLY.split())} chunks, {STREAM_CHUNK_DELAY * 1000:g} ms apart)\n")
    measured = median_rows(rows)
    table = [*measured.values(), *(r for r in rows if r.rps is None)]
    if args.rounds > 1:
        print(f"{args.rounds} rounds, each target in turn in every round; every figure is the median over rounds")
        for target in measured:
            print(f"  {target} req/s by round: {', '.join(_num(r.rps, 0) for r in rows if r.target == target)}")
        print()
    print_table([("TARGET", f"REQ/S @{args.connections}", "P50 MS", "P99 MS", "MAX MS", "TTFB P50 MS", "GAP P50 MS", "PEAK RSS MB", "ERRORS")]
                + [(r.target, _num(r.rps, 0), _num(r.p50_ms, 2), _num(r.p99_ms, 2), _num(r.max_ms, 1), _num(r.ttfb_ms, 2), _num(r.gap_ms, 1),
                    _num(r.rss_mb), r.errors) for r in table])
    arbstr, mitmdump, mitmdump_o, direct, portkey = (
        measured.get(name, Row(name)) for name in ("arbstr", "mitmdump", "mitmdump-O", "direct", "portkey"))
    print()
    baseline = measured.get(f"{BASELINE_PREFIX}{args.baseline}", Row("baseline"))
    for label, a, b, combine, unit in (
            (f"arbstr req/s / arbstr@{args.baseline} req/s", arbstr.rps, baseline.rps, float.__truediv__, ""),
            (f"arbstr CPU / arbstr@{args.baseline} CPU per request", cpu_per_request(arbstr),
             cpu_per_request(baseline), float.__truediv__, ""),
            ("arbstr req/s / mitmdump req/s", arbstr.rps, mitmdump.rps, float.__truediv__, ""),
            ("arbstr req/s / mitmdump -O req/s", arbstr.rps, mitmdump_o.rps, float.__truediv__, ""),
            ("arbstr req/s / portkey req/s", arbstr.rps, portkey.rps, float.__truediv__, ""),
            ("arbstr p50 - mitmdump p50", arbstr.p50_ms, mitmdump.p50_ms, float.__sub__, " ms"),
            ("arbstr TTFB - direct TTFB", arbstr.ttfb_ms, direct.ttfb_ms, float.__sub__, " ms"),
            ("arbstr chunk gap - direct chunk gap", arbstr.gap_ms, direct.gap_ms, float.__sub__, " ms")):
        if a is not None and b:
            print(f"{label:<38}{combine(a, b):8.2f}{unit}")
    print(f"\nCPU during the req/s run, % of one core ({os.cpu_count()} cores in all):")
    print_table([("TARGET", "CLIENT", "UPSTREAM", "PROXY", "TOTAL")]
                + [(r.target, *(_num(r.cpu_percent.get(name), 0) for name in ("client", "upstream", "proxy")),
                    _num(sum(r.cpu_percent.values()), 0)) for r in measured.values()])
    notes = [f"{r.target}: {note}" for r in rows for note in r.notes]
    if notes:
        print()
    for note in notes:
        print(f"  - {note}")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: 2 s of load, 100 requests, 20 streams")
    parser.add_argument("--duration", type=float, help="seconds of measured load per target (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (default 1)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--requests", type=int, help="sequential requests for latency (default 1000)")
    parser.add_argument("--streams", type=int, help="sequential streams for TTFB (default 50)")
    parser.add_argument("--only", type=_targets,
                        help=f"comma-separated targets among {', '.join(TARGETS)} (default: all, portkey only if "
                             f"installed)")
    parser.add_argument("--with-portkey", action="store_true",
                        help=f"npm install Portkey's gateway into {PORTKEY_DIR.relative_to(ROOT)} if needed, and "
                             f"measure it")
    parser.add_argument("--proxy-fd-limit", type=int, metavar="N",
                        help="soft open-files limit of the proxy process (default: the hard limit)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure `arbstr serve` from git revision REV (row arbstr@REV), e.g. the commit "
                             "before a change, to weigh the change in the same run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, in turn, and report medians (default 1)")
    parser.add_argument("--soak", action="store_true", help="hold many slow streams open through arbstr instead")
    parser.add_argument("--soak-streams", type=int, default=1000, help="concurrent streams (default 1000)")
    parser.add_argument("--soak-seconds", type=float, default=30, help="length of each stream (default 30)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (2.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.requests = args.requests or (100 if quick else 1000)
    args.streams = args.streams or (20 if quick else 50)
    args.only = args.only or (("arbstr",) if args.soak else
                              tuple(name for name in TARGETS if name != "portkey" or portkey_installed()))
    if args.with_portkey and "portkey" not in args.only:
        args.only += ("portkey",)
    if args.baseline:
        if args.soak:
            parser.error("--baseline weighs req/s and latency, not the soak")
        args.only = tuple(chain.from_iterable(
            (name, f"{BASELINE_PREFIX}{args.baseline}") if name == "arbstr" else (name,) for name in args.only))
        if "arbstr" not in args.only:
            args.only += (f"{BASELINE_PREFIX}{args.baseline}",)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.soak and "direct" in args.only:
        parser.error(f"--soak measures proxies: choose --only among {', '.join(TARGETS[1:])}")
    return args


def _targets(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    if not chosen or set(chosen) - set(TARGETS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {', '.join(TARGETS)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    if "portkey" in args.only and (reason := portkey_unavailable(args.with_portkey)):
        print(f"portkey: skipped, {one_line(reason)}")
        args.only = tuple(name for name in args.only if name != "portkey")
    print_machine(args.only)
    started = time.monotonic()
    if args.soak:
        run_soak(args)
    else:
        rows = []
        with tempfile.TemporaryDirectory(prefix="arbstr-bench-") as tmp, \
                upstream(STREAM_CHUNK_DELAY, STREAM_REPLY) as (upstream_port, upstream_pid):
            sources: dict[str, Path] = {}
            if args.baseline:
                sources[f"{BASELINE_PREFIX}{args.baseline}"] = export_revision(args.baseline, Path(tmp))
            for round_ in range(args.rounds):
                for target in args.only:
                    try:
                        rows.append(measure_target(target, upstream_port, upstream_pid, Path(tmp), args, sources,
                                                   round_))
                    except (RuntimeError, OSError) as exc:
                        if target == "portkey":
                            print(f"portkey: skipped, it did not start or answer: {one_line(str(exc))}")
                            args.only = tuple(name for name in args.only if name != "portkey")
                        else:
                            rows.append(Row(target, notes=[f"not measured: {exc}"]))
        print_results(rows, args)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
