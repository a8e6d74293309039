"""A client's chat completion request, read and checked once; everything after works on `ChatRequest`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from arbstr.errors import InvalidRequest
from arbstr.jsonread import read_json
from arbstr.tokens import estimate_prompt_tokens, message_text, prompt_token_bound


@dataclass(slots=True)
class ChatRequest:
    """A chat completion request as arbstr reads it.

    Not frozen, though nothing changes it once made: every request makes one, and a frozen
    dataclass's __init__ (object.__setattr__ per field) costs several times a plain one's."""

    model: str
    stream: bool
    messages: list[dict[str, Any]]
    max_output_tokens: int | None
    """The client's `max_completion_tokens` / `max_tokens`: an upper bound on the reply."""
    input_tokens: int
    """Estimated prompt tokens."""
    signals: frozenset[str] = frozenset()
    """What the request says about its reply beyond its size (see `request_signals`)."""
    prompt_token_bound: int | None = None
    """The most prompt tokens it can be billed for (see `tokens.prompt_token_bound`); None: unknown."""

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message.get("content"))
        return ""


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Check a `/v1/chat/completions` body; InvalidRequest says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.", code="invalid_body") from None
    try:
        body = read_json(text)
        if isinstance(body, dict) and any(isinstance(body.get(key), float) for key in _TOKEN_LIMITS):
            body = json.loads(text)  # an integer past 64 bits, which orjson reads as a float, is read as json reads it
    except ValueError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", code="missing_model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' is required and must be a non-empty array.", code="missing_messages")
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidRequest("Each entry of 'messages' must be an object.", code="invalid_messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", code="invalid_stream")
    return ChatRequest(
        model=model,
        stream=bool(stream),
        messages=messages,
        max_output_tokens=_max_output_tokens(body),
        input_tokens=estimate_prompt_tokens(messages),
        signals=request_signals(body, messages),
        prompt_token_bound=prompt_token_bound(len(raw), messages),
    )


LONG_HISTORY = 8
"""Messages from which a conversation counts as long: its replies tend to differ from a first turn's."""


def request_signals(body: dict[str, Any], messages: list[dict[str, Any]]) -> frozenset[str]:
    """Features that shape the reply length, learned apart within a policy: `tools` (tools or
    functions offered), `json` (a JSON response format), `usage` (stream_options sent), `long`
    (a long conversation history)."""
    signals = []
    if body.get("tools") or body.get("functions"):
        signals.append("tools")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        signals.append("json")
    if isinstance(body.get("stream_options"), dict):
        signals.append("usage")
    if len(messages) >= LONG_HISTORY:
        signals.append("long")
    return frozenset(signals) if signals else NO_SIGNALS


NO_SIGNALS: frozenset[str] = frozenset()
"""Most requests' signals: one set, not a new empty one per request."""


_TOKEN_LIMITS = ("max_completion_tokens", "max_tokens")
"""The integers of a request arbstr reads: the reply's token limits."""


def _max_output_tokens(body: dict[str, Any]) -> int | None:
    limits = []
    for key in _TOKEN_LIMITS:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{key}' must be a positive integer.", code="invalid_max_tokens")
        limits.append(value)
    return min(limits) if limits else None
