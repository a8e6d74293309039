"""Removing secrets from text a provider wrote, before arbstr stores, logs or shows it.

A provider's error text is not arbstr's to trust: a node may quote the key or Cashu token it was
paid with ("invalid key sk-..."), and that text would otherwise travel into the client's 502,
`/health`, the ledger, the log and mitmweb. Every configured secret is replaced, and so is
anything shaped like one (a Cashu token, an `sk-` key, a bearer credential), configured or not.

The secrets live in one process-wide set because the text to clean turns up at many edges
(attempts, health, response bodies) that should not each carry the configuration. Secrets are
only ever added: a key replaced by a config reload must stay hidden in text that quotes it later.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6
"""Shorter configured values are not replaced as such: doing so would shred ordinary words."""

_SHAPES = (
    r"cashu[AB][A-Za-z0-9_\-+/=]{8,}",  # a Cashu token (V3 base64url JSON, V4 CBOR)
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-.]{6,}",  # OpenAI- and Routstr-style API keys
    r"(?i:(?<=bearer )(?!\[REDACTED\])[^\s\"',;]{6,})",  # whatever follows `Bearer `
)

_MARKERS = (b"cashu", b"sk-", b"bearer ")
"""What every match of a shape holds, lower-cased: text without any of them (nor a remembered
secret) needs no regex search at all."""

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_secret_bytes: tuple[bytes, ...] = ()
_text_pattern: re.Pattern[str]
_bytes_pattern: re.Pattern[bytes]


def _compile() -> None:
    global _text_pattern, _bytes_pattern, _secret_bytes
    # Longest first, so a secret that contains another is replaced whole.
    literal = [re.escape(s) for s in sorted(_secrets, key=len, reverse=True)]
    source = "|".join([*literal, *_SHAPES])
    _text_pattern = re.compile(source)
    _bytes_pattern = re.compile(source.encode("utf-8"))
    _secret_bytes = tuple(secret.encode("utf-8") for secret in _secrets)


_compile()


def remember(secrets: Iterable[str | None]) -> None:
    """Add secrets (provider keys, tokens) to those `redact` removes; empty or short ones are ignored."""
    global _secrets
    new = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH} - _secrets
    if not new:
        return
    with _lock:
        _secrets = _secrets | new
        _compile()


def redact(text: str, also: Iterable[str] = ()) -> str:
    """`text` with every remembered secret, every secret in `also` and every secret-shaped word
    replaced by [REDACTED]."""
    for secret in also:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return _text_pattern.sub(REDACTED, text) if text else text


def redact_bytes(data: bytes) -> bytes:
    """`redact` for a raw body or header value, matched on its UTF-8 bytes without decoding it."""
    return _bytes_pattern.sub(REDACTED.encode(), data) if data else data


def redact_fields(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`redact_bytes` of each header value. Almost no answer holds a secret, so one look over all
    the values (joined by a newline, which no secret shape spans) decides whether any needs it."""
    fields = list(fields)
    if not _may_hold_secret(b"\n".join([value for _, value in fields])):
        return fields
    return [(name, redact_bytes(value)) for name, value in fields]


def _may_hold_secret(data: bytes) -> bool:
    """False only when no secret and no shape can match: a few substring searches, where the
    pattern's search tries every alternative at every position."""
    lowered = data.lower()
    for marker in _MARKERS:
        if marker in lowered:
            return True
    for secret in _secret_bytes:
        if secret in data:
            return True
    return False
