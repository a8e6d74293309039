"""End-to-end fixtures: the real proxy as a subprocess (`arbstr serve` or `mitmdump -s addons/arbstr.py`)
on a free port, in front of Routstr-like mock providers, driven by the official openai client."""

from __future__ import annotations

import http.server
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLIENT_KEY = "sk-client-own-secret-0123456789"
LISTENING = re.compile(r"listening at (?:http://)?([0-9.]+):(\d+)")
MITMWEB_LISTENING = re.compile(r"reverse proxy to \S+ listening at ([0-9.]+):(\d+)")
KINDS = ("serve", "mitmdump")
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    """A port nothing listens on (for a provider that is down, or a server that needs a fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def get_server(answer: Callable[[], bytes], content_type: str | None = None,
               tls: ssl.SSLContext | None = None) -> Iterator[http.server.ThreadingHTTPServer]:
    """A loopback HTTP(S) server on a free port answering every GET with 200 and `answer()`;
    shut down when the block ends."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answer()
            self.send_response(200)
            if content_type:
                self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class RunningProcess:
    """A subprocess writing to a log in `workdir`, started and waited for until its log shows
    `pattern` `count` times (a server's "listening at" line)."""

    def __init__(self, command: list[str], workdir: Path, *, name: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None, pattern: re.Pattern[str] = LISTENING, count: int = 1) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=cwd or workdir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env)
        self.matches = self._wait_for(pattern, count)

    def _wait_for(self, pattern: re.Pattern[str], count: int) -> list[re.Match[str]]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(matches := list(pattern.finditer(self.log()))) >= count:
                return matches
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log_path.stem} exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.log_path.stem} did not start listening:\n{self.log()}")

    @property
    def port(self) -> int:
        return int(self.matches[0].group(2))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `grace` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class RunningProxy(RunningProcess):
    """arbstr serve or mitmdump with the addon, on a free port."""

    def __init__(self, kind: str, config: Path, workdir: Path, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), mode: str = "reverse") -> None:
        if kind == "serve":
            command = [str(BIN / "arbstr"), "serve", "-c", str(config), "--listen", "127.0.0.1:0",
                       "--confdir", str(workdir / "mitmproxy"), "--mode", mode]
        else:
            command = [str(BIN / "mitmdump"), "-s", str(ROOT / "addons" / "arbstr.py"),
                       "--mode", "reverse:http://127.0.0.1:1" if mode == "reverse" else mode,
                       "--set", "connection_strategy=lazy",
                       "--set", f"arbstr_config={config}", "--listen-host", "127.0.0.1", "-p", "0",
                       "--set", f"confdir={workdir / 'mitmproxy'}"]
        super().__init__(command + list(extra_args), workdir, name=kind, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.log_path.parent / "mitmproxy" / "mitmproxy-ca-cert.pem"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20, headers={"authorization": f"Bearer {CLIENT_KEY}"})

    def wait_for_prices(self, reads: int = 1) -> dict:
        """Wait until the proxy has read every provider's prices `reads` times; its /health then."""
        deadline = time.monotonic() + 10
        with self.http() as http:
            while time.monotonic() < deadline:
                answer = http.get("/health").json()
                if answer["price_reads"] >= reads:
                    return answer
                time.sleep(0.02)
        raise AssertionError(f"prices were not read {reads} times within 10 s: {answer}")


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator:
    """Start a subprocess (see RunningProcess) in the test's temp dir; stopped when the test ends."""
    running: list[RunningProcess] = []

    def start(command: list[str], **kwargs) -> RunningProcess:
        running.append(RunningProcess(command, tmp_path, **kwargs))
        return running[-1]

    yield start
    for process in running:
        process.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator:
    """Write a config into a temp dir and start the proxy of the given kind on a free port."""
    running: list[RunningProxy] = []

    def start(kind: str, config_text: str, env: dict[str, str] | None = None,
              extra_args: tuple[str, ...] = (), mode: str = "reverse") -> RunningProxy:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        running.append(RunningProxy(kind, config, tmp_path, env, extra_args, mode))
        return running[-1]

    yield start
    for proxy in running:
        proxy.stop()


def start_mitmweb(start_process, workdir: Path, config: Path, web_port: int, web_token: str,
                  extra_args: tuple[str, ...] = (), listen: tuple[str, ...] = ("--listen-host", "127.0.0.1", "-p", "0"),
                  pattern: re.Pattern[str] = MITMWEB_LISTENING) -> RunningProcess:
    """mitmweb with the addon in reverse mode; its web API on `web_port`, opened by `web_token`.
    `listen=()` leaves where it listens to the config's `[server] listen` (then say where in `pattern`)."""
    return start_process(
        [str(BIN / "mitmweb"), "-s", str(ROOT / "addons" / "arbstr.py"), "--mode", "reverse:http://127.0.0.1:1",
         "--set", "connection_strategy=lazy", "--set", f"arbstr_config={config}", *listen,
         "--web-host", "127.0.0.1", "--web-port", str(web_port), "--set", "web_open_browser=false",
         "--set", f"web_password={web_token}", "--set", f"confdir={workdir / 'mitmproxy'}", *extra_args],
        name="mitmweb", pattern=pattern)


@pytest.fixture
def browser(tmp_path):
    """Headless chromium with a fresh profile and nothing that phones home."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run make test-deps"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"])
        try:
            yield context
        finally:
            context.close()
