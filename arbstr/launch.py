"""The `arbstr` command: starts `arbstr serve` under `python -O` before anything heavy is imported."""

from __future__ import annotations

import os
import sys


def run_optimized() -> None:
    """Re-run this command line under `python -O`, once, unless PYTHONOPTIMIZE says otherwise.

    mitmproxy type-checks every request and response it builds, and every event its protocol
    layers receive, in `if __debug__` blocks that only -O switches off: about 15% of what the proxy
    spends on a request (bench/proxy.py). arbstr itself keeps no logic in asserts, and the
    end-to-end tests run it this way. Setting PYTHONOPTIMIZE (even to 0) keeps the interpreter as it is.
    """
    if sys.flags.optimize or "PYTHONOPTIMIZE" in os.environ:
        return
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-O", "-m", "arbstr.cli", *sys.argv[1:]])


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        run_optimized()
    from arbstr.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
