"""arbstr's own log: its level and format, set apart from mitmproxy's flow output.

`ARBSTR_LOG` (or `arbstr serve --log-level`) works like Rust's `RUST_LOG`: a level for arbstr
(`debug`, `info`, `warning`, `error`), optionally followed by `logger=level` pairs for a
dependency, e.g. `debug,peewee=debug` to see the SQL too. `ARBSTR_LOG_FORMAT=json` writes one
JSON object per line (time, level, logger, event, request_id, provider, message, and the
event's own fields) for log shippers. arbstr's records go to stderr through their own handler
and never through mitmproxy's, so `termlog_verbosity` and `flow_detail` keep governing the flow
output alone. Every line passes through `arbstr.redact.redact` before it is written: no
configured secret, nor anything shaped like one, reaches the log, whatever a message or a
traceback holds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from arbstr.redact import redact

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
QUIET_DEPENDENCIES = ("peewee",)
"""Loggers of dependencies that speak at debug level (peewee logs every SQL statement): kept at
warning, whatever the root logger's level, unless ARBSTR_LOG names them."""

log = logging.getLogger("arbstr")


def parse_log_spec(spec: str) -> tuple[int, dict[str, int]]:
    """`info` or `debug,peewee=debug`: arbstr's level and any other logger's; ValueError naming what is wrong."""
    level = LEVELS[DEFAULT_LEVEL]
    others: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.rpartition("=")
        if value.lower() not in LEVELS:
            raise ValueError(f"'{value}' is not a log level: use one of {', '.join(LEVELS)} "
                             "(optionally followed by logger=level pairs, e.g. debug,peewee=debug)")
        if name:
            others[name.strip()] = LEVELS[value.lower()]
        else:
            level = LEVELS[value.lower()]
    return level, others


def parse_log_format(text: str) -> str:
    if text.lower() not in FORMATS:
        raise ValueError(f"'{text}' is not a log format: use text or json")
    return text.lower()


def enabled(level: int) -> bool:
    """Whether arbstr's log takes this level: ask first where building an event's fields costs."""
    return log.isEnabledFor(level)


def event(level: int, name: str, message: str, *args: Any, request_id: str | None = None,
          provider: str | None = None, **fields: Any) -> None:
    """Log one event of arbstr's: its name and fields go into the JSON line as they are."""
    if log.isEnabledFor(level):
        log.log(level, message, *args,
                extra={"event": name, "request_id": request_id, "provider": provider, "fields": fields})


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = [f"{key}={value}" for key, value in _context(record).items() if value is not None]
        return line + (" [" + " ".join(context) + "]" if context else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "request_id": getattr(record, "request_id", None),
            "provider": getattr(record, "provider", None),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {"event": getattr(record, "event", None), "request_id": getattr(record, "request_id", None),
            "provider": getattr(record, "provider", None), **(getattr(record, "fields", None) or {})}


class ArbstrLogHandler(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (pytest swaps it), every line redacted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(redact(self.format(record)) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_handler = ArbstrLogHandler()


def configure_logging(spec: str | None = None, log_format: str | None = None) -> None:
    """Apply a level spec and a format (default: $ARBSTR_LOG, $ARBSTR_LOG_FORMAT, else info and text).

    ValueError when either is not understood. Applying it again replaces what was applied before.
    """
    spec = spec if spec is not None else os.environ.get("ARBSTR_LOG", DEFAULT_LEVEL)
    log_format = log_format if log_format is not None else os.environ.get("ARBSTR_LOG_FORMAT", "text")
    level, others = parse_log_spec(spec)
    _handler.setFormatter(JsonFormatter() if parse_log_format(log_format) == "json" else TextFormatter())
    _attach(log, level)
    for name in QUIET_DEPENDENCIES:
        if name not in others:
            dependency = logging.getLogger(name)
            dependency.setLevel(logging.WARNING)
            dependency.removeHandler(_handler)
            dependency.propagate = True
    for name, other_level in others.items():
        _attach(logging.getLogger(name), other_level)


def _attach(logger: logging.Logger, level: int) -> None:
    """The logger writes through arbstr's handler only, at its own level: not through the root
    logger, where mitmproxy's handler would filter it by termlog_verbosity and format it as a flow."""
    logger.setLevel(level)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.propagate = False
