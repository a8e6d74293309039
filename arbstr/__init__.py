"""arbstr: route OpenAI-compatible requests to the cheapest Routstr provider, through mitmproxy."""

__version__ = "0.1.0"
