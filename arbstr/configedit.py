"""Editing config.toml in place: add or remove a `[[providers]]` table, every other byte kept.

tomlkit keeps a document's comments and layout, but it files the comments above a table under
the table before it, so deleting a provider with it would drop the next table's comment and keep
this one's. So the edit is a splice of whole lines: tomlkit renders the new table and checks the
result, which must parse to exactly the old document with that one provider added or removed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions

from arbstr.config import normalize_base_url, parse_config
from arbstr.errors import ArbstrError

_HEADER = re.compile(r"^[ \t]*(\[\[?)[ \t]*([^\]#]+?)[ \t]*\]\]?[ \t]*(#.*)?$")


class ConfigEditError(ArbstrError):
    """The config file cannot be edited as asked; the message says why."""


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigEditError(f"the config is not valid TOML ({exc}): fix it first") from None


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _is_blank(line: str) -> bool:
    return not line.strip()


def _provider_spans(lines: Sequence[str]) -> list[tuple[int, int, int]]:
    """For each `[[providers]]` table in order: (first line of its leading comment, header line, end),
    lines [start, end) being the table with its comments; the comment block right above the next
    table's header belongs to that table, blank lines between tables to neither."""
    headers = []
    for index, line in enumerate(lines):
        match = _HEADER.match(line)
        if match:
            path = match.group(2).replace(" ", "")
            headers.append((index, match.group(1) == "[[" and path == "providers",
                            path == "providers" or path.startswith("providers.")))
    spans = []
    for position, (index, starts, _) in enumerate(headers):
        if not starts:
            continue
        following = [i for i, begins, inside in headers[position + 1:] if begins or not inside]
        end = following[0] if following else len(lines)
        if following:
            while end > index + 1 and _is_comment(lines[end - 1]):
                end -= 1
        while end > index + 1 and _is_blank(lines[end - 1]):
            end -= 1
        start = index
        while start > 0 and _is_comment(lines[start - 1]):
            start -= 1
        spans.append((start, index, end))
    return spans


def _provider_names(raw: dict[str, Any]) -> list[str]:
    providers = raw.get("providers", [])
    if not isinstance(providers, list):
        raise ConfigEditError("`providers` in the config is not a list of [[providers]] tables")
    return [p.get("name") if isinstance(p, dict) else None for p in providers]


def configured_names(text: str) -> set[str]:
    """The provider names a config already uses (none when it cannot be read as TOML)."""
    try:
        return {n for n in _provider_names(_parse(text)) if isinstance(n, str)}
    except ConfigEditError:
        return set()


def _check(text: str, expected: dict[str, Any]) -> str:
    """The edited text, once it is known to hold exactly what was meant and to be a valid config."""
    if _parse(text) != expected:
        raise ConfigEditError("the config's layout is too unusual to edit line by line; edit it by hand")
    try:
        parse_config(text, require_keys=False)
    except ArbstrError as exc:
        raise ConfigEditError(f"the edit would not be a valid config: {exc.message}") from None
    return text


def render_provider(name: str, url: str, api_key: str | None = None, models: Sequence[str] = (),
                    pricing: str | None = None, input_rate: Decimal | None = None,
                    output_rate: Decimal | None = None) -> str:
    """A `[[providers]]` table as tomlkit writes it."""
    table = tomlkit.table()
    table["name"] = name
    table["url"] = url
    if api_key is not None:
        table["api_key"] = api_key
    if pricing is not None:
        table["pricing"] = pricing
    if models:
        table["models"] = list(models)
    for key, rate in (("input_rate", input_rate), ("output_rate", output_rate)):
        if rate is not None:
            table[key] = float(rate) if rate != rate.to_integral_value() else int(rate)
    aot = tomlkit.aot()
    aot.append(table)
    document = tomlkit.document()
    document["providers"] = aot
    return tomlkit.dumps(document)


def add_provider(text: str, name: str, url: str, **fields: Any) -> str:
    """`text` with one more `[[providers]]` table, right after the last one (or at the end)."""
    raw = _parse(text)
    names = _provider_names(raw)
    if name in names:
        raise ConfigEditError(f"a provider named '{name}' is already configured")
    try:
        url = normalize_base_url(url)
    except ValueError as exc:
        raise ConfigEditError(str(exc)) from None
    table = render_provider(name, url, **fields)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    spans = _provider_spans(lines)
    at = spans[-1][2] if spans else len(lines)
    block = ("\n" if at and not _is_blank(lines[at - 1]) else "") + table
    if at < len(lines) and not _is_blank(lines[at]):
        block += "\n"
    edited = "".join(lines[:at]) + block + "".join(lines[at:])
    expected = dict(raw)
    expected["providers"] = list(raw.get("providers", [])) + [_parse(table)["providers"][0]]
    return _check(edited, expected)


def remove_provider(text: str, name: str) -> str:
    """`text` without the provider named `name`: its table, its per-model tables and the comment right above it."""
    raw = _parse(text)
    names = _provider_names(raw)
    if name not in names:
        known = ", ".join(str(n) for n in names) or "none"
        raise ConfigEditError(f"no provider is named '{name}' (configured: {known})")
    index = names.index(name)
    lines = text.splitlines(keepends=True)
    spans = _provider_spans(lines)
    if len(spans) != len(names):
        raise ConfigEditError("the config's providers are not all [[providers]] tables; edit it by hand")
    start, _, end = spans[index]
    while end < len(lines) and _is_blank(lines[end]):
        end += 1
    if end == len(lines):  # the last thing in the file: drop the blank lines before it instead
        while start > 0 and _is_blank(lines[start - 1]):
            start -= 1
    expected = dict(raw)
    expected["providers"] = [p for i, p in enumerate(raw["providers"]) if i != index]
    if not expected["providers"]:
        del expected["providers"]
    return _check("".join(lines[:start] + lines[end:]), expected)


def write_config(path: str | Path, text: str) -> None:
    """Replace the file at once (a crash leaves the old one or the new one), keeping its permissions."""
    path = Path(path)
    mode = path.stat().st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
