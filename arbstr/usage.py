"""What a chat completion response says it used and cost: tokens, the provider's own cost, the reply text.

Reads a whole JSON body, or watches an SSE stream chunk by chunk (split anywhere) without touching
its bytes. Pure (orjson and the standard library); nothing a provider sends can make it raise.

Cost is the provider's exact figure in millisats, looked up in this order: `usage.cost.total_msats`,
`cost.total_msats`, `metadata.routstr.cost.total_msats`, then `usage.cost_sats` × 1000 as a last
resort, since Routstr rounds `cost_sats` down to whole sats (0 for a 52 msat request).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

COST_HEADER = "x-routstr-cost-msats"
MAX_LINE_BYTES = 1 << 20
"""An SSE line, or one event's data, longer than this is dropped: it caps what a hostile stream can make us hold."""
MAX_TEXT_CHARS = 1 << 20
"""`output_text` keeps at most this many characters; plenty to estimate tokens from."""
MAX_AMOUNT = (1 << 63) - 1
"""Larger token counts or costs are nonsense; the cap keeps them within a signed 64-bit database integer."""

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_INTEGER = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class UsageReport:
    input_tokens: int | None
    """`usage.prompt_tokens`."""
    output_tokens: int | None
    """`usage.completion_tokens`."""
    cost_msats: int | None
    """What the provider says the request cost, in millisats (see the module docstring for where from)."""
    output_text: str
    """The assistant text seen, to estimate output tokens from when usage is missing."""
    complete: bool
    """JSON: the body was a JSON object. Stream: `data: [DONE]` arrived, or, failing that, a choice
    carried a `finish_reason` and the stream ended between events (not halfway through one)."""
    cache_read_tokens: int | None = None
    """Prompt tokens served from the provider's cache (included in `input_tokens`, as Routstr counts them)."""
    cache_read_msats: int | None = None
    """What those cached tokens cost, in millisats, when the provider says."""

    @property
    def has_usage(self) -> bool:
        return self.input_tokens is not None and self.output_tokens is not None


EMPTY_REPORT = UsageReport(None, None, None, "", False)


def cost_msats_from_headers(headers: Iterable[tuple[str, str]]) -> int | None:
    """The `X-Routstr-Cost-Msats` header: the first value that is a plain non-negative integer."""
    for name, value in headers:
        value = value.strip()
        if name.lower() == COST_HEADER and _HEADER_INTEGER.fullmatch(value) and int(value) <= MAX_AMOUNT:
            return int(value)
    return None


def read_json(data: bytes | str) -> Any:
    """`json.loads(data)` for what a provider sends. orjson parses it when it can (four times as
    fast; most answers); what orjson refuses (NaN, infinities, lone surrogates, other encodings
    than UTF-8, nesting past 1,024...) is left to `json.loads`, which parses or raises as ever. The
    one other difference, an integer of 64 bits or more read as a float, changes nothing read here:
    `_amount` takes neither such an int nor any float."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def usage_from_json(body: bytes) -> UsageReport:
    """Usage, cost and text of a non-streaming response; EMPTY_REPORT when the body is not a JSON object."""
    try:
        parsed = read_json(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return EMPTY_REPORT
    if not isinstance(parsed, dict):
        return EMPTY_REPORT
    input_tokens, output_tokens = _usage_tokens(parsed) or (None, None)
    text = _BoundedText()
    for choice in _choices(parsed):
        text.add(_dig(choice, "message", "content"))
    return UsageReport(input_tokens, output_tokens, _cost_msats_in(parsed), text.value, complete=True,
                       **_cache_reads(parsed))


class StreamUsageObserver:
    """Watches a chat completion SSE stream, fed in chunks split anywhere, and reports its usage at the end.

    Follows WHATWG EventSource parsing (line ends `\\n`, `\\r\\n` or `\\r`; one space after `data:`
    stripped; data lines joined by `\\n`; a leading BOM ignored) and reads every event whose data is a
    JSON object, whatever its type. The last chunk carrying usage sets the token counts; the last one
    carrying a cost sets the cost. Unlike EventSource, `finish` also reads an event the stream cut off
    before its closing blank line, so usage still counts when a provider omits it.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # the first bytes, held until we know whether they start with a BOM
        self._started = False
        self._line = bytearray()
        self._dropping_line = False
        self._skip_lf = False  # the last chunk ended with \r: a \n opening the next one ends the same line
        self._data_lines: list[bytes] = []
        self._data_size = 0
        self._dropping_event = False
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self._cost_msats: int | None = None
        self._cache: dict[str, int | None] = {}
        self._text = _BoundedText()
        self._done = False
        self._finish_reason_seen = False
        self._report: UsageReport | None = None

    def feed(self, chunk: bytes) -> None:
        """Observe the next bytes of the stream; costs O(len(chunk)) whatever came before."""
        if not self._started:
            self._head += chunk
            if len(self._head) < len(_BOM) and _BOM.startswith(self._head):
                return
            self._started = True
            chunk = bytes(self._head).removeprefix(_BOM)
            self._head.clear()
        if not chunk:
            return
        start = 1 if self._skip_lf and chunk[0] == ord("\n") else 0
        self._skip_lf = chunk[-1] == ord("\r")
        for line_end in _LINE_END.finditer(chunk, start):
            self._end_line(chunk[start:line_end.start()])
            start = line_end.end()
        self._extend_line(chunk[start:])

    def finish(self) -> UsageReport:
        """The report, once the stream has ended or was cut short; later calls return the same report."""
        if self._report is None:
            self._extend_line(bytes(self._head))  # at most a partial BOM: the stream ended within 3 bytes
            self._head.clear()
            ended_mid_event = (bool(self._line) or self._dropping_line
                               or bool(self._data_lines) or self._dropping_event)
            if self._line or self._dropping_line:
                self._end_line(b"")
            self._dispatch()
            complete = self._done or (self._finish_reason_seen and not ended_mid_event)
            self._report = UsageReport(self._input_tokens, self._output_tokens, self._cost_msats,
                                       self._text.value, complete, **self._cache)
        return self._report

    def _extend_line(self, part: bytes) -> None:
        if self._dropping_line:
            return
        if len(self._line) + len(part) > MAX_LINE_BYTES:
            self._dropping_line = True
            self._line.clear()
        else:
            self._line += part

    def _end_line(self, tail: bytes) -> None:
        too_long = self._dropping_line or len(self._line) + len(tail) > MAX_LINE_BYTES
        line = b"" if too_long else bytes(self._line) + tail
        self._line.clear()
        self._dropping_line = False
        if not too_long:
            self._read_line(line)

    def _read_line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        field, _, value = line.partition(b":")
        # A comment (empty field name), or a field other than data (event, id, retry...): no usage there.
        if field != b"data" or self._dropping_event:
            return
        value = value.removeprefix(b" ")
        self._data_size += len(value) + 1
        if self._data_size > MAX_LINE_BYTES:
            self._dropping_event = True
            self._data_lines.clear()
        else:
            self._data_lines.append(value)

    def _dispatch(self) -> None:
        payload = b"\n".join(self._data_lines)  # empty when the event had no data, or too much
        self._data_lines.clear()
        self._data_size = 0
        self._dropping_event = False
        if payload.strip() == b"[DONE]":
            self._done = True
            return
        try:
            # Invalid UTF-8 becomes U+FFFD, as EventSource decodes it, so the rest of the chunk still counts.
            chunk = read_json(payload.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return
        if isinstance(chunk, dict):
            self._read_chunk(chunk)

    def _read_chunk(self, chunk: dict[str, Any]) -> None:
        tokens = _usage_tokens(chunk)
        if tokens is not None:
            self._input_tokens, self._output_tokens = tokens
        cost = _cost_msats_in(chunk)
        if cost is not None:
            self._cost_msats = cost
        cache = _cache_reads(chunk)
        if cache["cache_read_tokens"] is not None:
            self._cache = cache
        for choice in _choices(chunk):
            self._text.add(_dig(choice, "delta", "content"))
            if choice.get("finish_reason"):
                self._finish_reason_seen = True


class _BoundedText:
    """Text gathered piece by piece, up to MAX_TEXT_CHARS."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._room = MAX_TEXT_CHARS

    def add(self, text: Any) -> None:
        if isinstance(text, str) and self._room:
            part = text[:self._room]
            self._parts.append(part)
            self._room -= len(part)

    @property
    def value(self) -> str:
        return "".join(self._parts)


def _dig(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...`, or None where any level is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _amount(value: Any) -> int | None:
    # bool is an int subclass, and `true` is no token count.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_AMOUNT:
        return value
    return None


def _usage_tokens(body: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """(prompt, completion) tokens when the body's `usage` gives either; None when it gives neither,
    as OpenAI's `"usage": null` on every chunk but the last."""
    tokens = (_amount(_dig(body, "usage", "prompt_tokens")), _amount(_dig(body, "usage", "completion_tokens")))
    return None if tokens == (None, None) else tokens


def _cost_msats_in(body: dict[str, Any]) -> int | None:
    for path in (("usage", "cost", "total_msats"), ("cost", "total_msats"),
                 ("metadata", "routstr", "cost", "total_msats")):
        if (msats := _amount(_dig(body, *path))) is not None:
            return msats
    sats = _amount(_dig(body, "usage", "cost_sats"))
    return None if sats is None else _amount(sats * 1000)


def _cache_reads(body: dict[str, Any]) -> dict[str, int | None]:
    """Cached prompt tokens and their cost: Routstr's `usage.cost.cache_read_*` (or the same in the
    top-level or metadata cost object), else OpenAI's `usage.prompt_tokens_details.cached_tokens`."""
    for cost in (_dig(body, "usage", "cost"), body.get("cost"), _dig(body, "metadata", "routstr", "cost")):
        tokens = _amount(_dig(cost, "cache_read_input_tokens"))
        if tokens is not None:
            return {"cache_read_tokens": tokens, "cache_read_msats": _amount(_dig(cost, "cache_read_msats"))}
    tokens = _amount(_dig(body, "usage", "cache_read_input_tokens"))
    if tokens is None:
        tokens = _amount(_dig(body, "usage", "prompt_tokens_details", "cached_tokens"))
    return {"cache_read_tokens": tokens, "cache_read_msats": None}


def _choices(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    choices = body.get("choices")
    if isinstance(choices, list):
        yield from (choice for choice in choices if isinstance(choice, dict))
