"""mitmproxy script: `mitmdump -s addons/arbstr.py --mode reverse:http://127.0.0.1:1 --set connection_strategy=lazy`.

The config comes from `--set arbstr_config=PATH`, else $ARBSTR_CONFIG, else ./config.toml.
"""

import sys
from pathlib import Path

# Works from a checkout even when the package is not installed in mitmproxy's Python.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arbstr.addon import ArbstrAddon  # noqa: E402

addons = [ArbstrAddon()]
