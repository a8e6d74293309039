"""A real Cashu mint (nutshell, FakeWallet Lightning backend) on a loopback port, for tests.

nutshell pins h11<0.15 and httpx<0.26, mitmproxy 12 pins h11==0.16: the mint cannot live in
arbstr's venv, so it runs from its own (`.venv-mint`, made by `make test-deps`, or the Python
named by $ARBSTR_MINT_PYTHON). The test binds the listening socket itself (port 0) and hands it
to uvicorn as an inherited file descriptor, so no port is ever guessed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mint_python() -> Path:
    """The interpreter of the venv that has nutshell installed."""
    configured = os.environ.get("ARBSTR_MINT_PYTHON")
    return Path(configured) if configured else ROOT / ".venv-mint" / "bin" / "python"


class TestMint:
    """Start with `start()` (or `with`), stop with `stop()`; `url` is the mint's URL."""

    __test__ = False  # not a pytest test class

    def __init__(self, input_fee_ppk: int = 0) -> None:
        self.input_fee_ppk = input_fee_ppk
        self._process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> TestMint:
        python = mint_python()
        if not python.exists():
            raise RuntimeError(f"no mint venv at {python}: run `make test-deps` (or set ARBSTR_MINT_PYTHON)")
        self._tmp = tempfile.TemporaryDirectory(prefix="arbstr-mint-")
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.set_inheritable(True)
        port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MINT_", "CASHU_"))}
        env.update(MINT_BACKEND_BOLT11_SAT="FakeWallet", MINT_LISTEN_HOST="127.0.0.1", MINT_LISTEN_PORT=str(port),
                   MINT_PRIVATE_KEY="arbstr-test-mint-" + os.urandom(8).hex(),
                   MINT_DATABASE=f"{self._tmp.name}/data", CASHU_DIR=f"{self._tmp.name}/cashu",
                   MINT_INPUT_FEE_PPK=str(self.input_fee_ppk), MINT_RATE_LIMIT="false",
                   FAKEWALLET_DELAY_INCOMING_PAYMENT="0", FAKEWALLET_DELAY_OUTGOING_PAYMENT="0",
                   MINT_URL=self.url, DEBUG="false")
        fd = self._socket.fileno()
        self._log = open(f"{self._tmp.name}/mint.log", "wb")
        self._process = subprocess.Popen(
            [str(python), "-c", "from cashu.mint.main import main; main()", f"--fd={fd}"],
            env=env, cwd=self._tmp.name, pass_fds=(fd,), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/keysets", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = Path(f"{self._tmp.name}/mint.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"the test mint did not come up: {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            self._log.close()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TestMint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
