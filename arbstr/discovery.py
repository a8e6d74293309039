"""Finding Routstr providers: announcements on Nostr relays and a public directory, each one probed.

Providers announce themselves with kind-38421 Nostr events (tags `d` = provider id, `u` = URLs,
`mint` = accepted mints; content `{"name", "about"}`). Relays are asked over a websocket (the
`websockets` library) for those events; each event's id and signature are checked with the
`nostr-sdk` library, and a forged or malformed one is skipped and reported, not trusted. The
directory (`GET .../v1/providers/`) is read the same way. Every provider found is then probed:
its `/v1/info` and `/v1/models`, with how long they took. Nothing here raises on bad input or an
unreachable relay or provider: each becomes a line in the report.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from arbstr.config import normalize_base_url
from arbstr.httpclient import HttpClient
from arbstr.market import LiveModel, MarketError, fetch_json, parse_model_list

ANNOUNCEMENT_KIND = 38421
MAX_EVENTS = 500
"""Announcements asked of each relay."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Announcement:
    """A provider as a relay or the directory describes it."""

    provider_id: str
    name: str
    urls: tuple[str, ...]
    mints: tuple[str, ...]
    source: str
    """`nostr <relay>` or `directory`."""
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class Probe:
    """What a provider answered when asked, and how fast."""

    models: dict[str, LiveModel] = field(default_factory=dict)
    mints: tuple[str, ...] = ()
    name: str | None = None
    latency_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """One provider: its announcement and what probing it showed."""

    name: str
    """A name fit for config.toml, unique within the report."""
    url: str
    announcement: Announcement
    probe: Probe

    @property
    def mints(self) -> tuple[str, ...]:
        return self.announcement.mints or self.probe.mints


@dataclass(slots=True)
class Report:
    found: list[Found] = field(default_factory=list)
    sources: list[tuple[str, str | None]] = field(default_factory=list)
    """Each relay and directory asked, with why it could not be read (None when it was)."""
    skipped: list[str] = field(default_factory=list)
    """Announcements not used, with why (bad signature, malformed tags)."""


def _tag_values(tags: Sequence[Any], name: str) -> list[str]:
    """Every value of every `name` tag (`["u", "a", "b"]` and two `["u", ...]` tags alike)."""
    return [value for tag in tags if isinstance(tag, list) and tag and tag[0] == name
            for value in tag[1:] if isinstance(value, str) and value.strip()]


def parse_announcement(event: dict[str, Any], source: str) -> Announcement:
    """A kind-38421 event whose signature was checked; ValueError naming what is malformed."""
    tags = event.get("tags")
    if not isinstance(tags, list):
        raise ValueError("no tags")
    ids = _tag_values(tags, "d")
    if not ids:
        raise ValueError("no d tag (provider id)")
    urls = _reachable_urls(_tag_values(tags, "u"))
    if not urls:
        raise ValueError(f"{ids[0]}: no http(s) URL in its u tags")
    try:
        content = json.loads(event.get("content") or "{}")
    except ValueError:
        content = {}
    name = content.get("name") if isinstance(content, dict) and isinstance(content.get("name"), str) else ids[0]
    created = event.get("created_at")
    return Announcement(ids[0], name.strip() or ids[0], tuple(urls),
                        tuple(dict.fromkeys(_tag_values(tags, "mint"))), source,
                        created if isinstance(created, int) else 0)


def _reachable_urls(urls: Iterable[Any]) -> list[str]:
    """The http(s) base URLs among `urls`, without Tor's .onion ones (not reachable without Tor)."""
    found = []
    for url in urls:
        if not isinstance(url, str):
            continue
        try:
            base = normalize_base_url(url)
        except ValueError:
            continue
        if not urlsplit(base).hostname.endswith(".onion"):
            found.append(base)
    return list(dict.fromkeys(found))


def check_signature(event: dict[str, Any]) -> str | None:
    """Why an event is not genuinely signed by its pubkey (None when it is), per NIP-01."""
    from nostr_sdk import Event  # a native library: loaded only when there is something to check
    try:
        parsed = Event.from_json(json.dumps(event))
    except Exception as exc:  # nostr-sdk raises its own error types for every malformed event
        return f"not a Nostr event ({exc})"
    if not parsed.verify_id():
        return "its id is not the hash of its content"
    if not parsed.verify_signature():
        return "bad signature"
    return None


def parse_directory(payload: Any) -> tuple[list[Announcement], list[str]]:
    """The directory's `{"providers": [...]}`: announcements, and entries skipped with why."""
    entries = payload.get("providers") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise ValueError('no "providers" list')
    found, skipped = [], []
    for entry in entries:
        if not isinstance(entry, dict):
            skipped.append("directory: an entry that is not an object")
            continue
        ident = str(entry.get("id") or entry.get("name") or "?")
        endpoints = entry.get("endpoint_urls")
        urls = _reachable_urls([entry.get("endpoint_url"), *(endpoints if isinstance(endpoints, list) else [])])
        if not urls:
            skipped.append(f"directory: {ident}: no http(s) endpoint URL")
            continue
        mints = [m for m in entry.get("mint_urls") or [] if isinstance(m, str)]
        name = entry.get("name") if isinstance(entry.get("name"), str) and entry["name"].strip() else ident
        found.append(Announcement(ident, name.strip(), tuple(urls), tuple(mints), "directory"))
    return found, skipped


async def read_relay(url: str, timeout: float) -> list[dict[str, Any]]:
    """The kind-38421 events a relay holds (up to MAX_EVENTS), read until it says it has sent them all."""
    from websockets.asyncio.client import connect
    subscription = secrets.token_hex(8)
    events = []
    async with asyncio.timeout(timeout):
        async with connect(url, open_timeout=timeout, max_size=2**22) as socket:
            await socket.send(json.dumps(["REQ", subscription, {"kinds": [ANNOUNCEMENT_KIND], "limit": MAX_EVENTS}]))
            async for message in socket:
                try:
                    frame = json.loads(message)
                except ValueError:
                    continue
                if not isinstance(frame, list) or len(frame) < 2 or frame[1] != subscription:
                    continue
                if frame[0] == "EVENT" and len(frame) >= 3 and isinstance(frame[2], dict):
                    events.append(frame[2])
                elif frame[0] in ("EOSE", "CLOSED"):
                    break
            await socket.send(json.dumps(["CLOSE", subscription]))
    return events


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def gather_announcements(relays: Iterable[str], directory: str | None, timeout: float,
                               client: HttpClient, report: Report) -> list[Announcement]:
    """Every announcement from the relays (signatures checked) and the directory; the newest per provider."""
    relays = list(dict.fromkeys(relays))
    results = await asyncio.gather(*(read_relay(url, timeout) for url in relays), return_exceptions=True)
    announcements: dict[tuple[str, str], Announcement] = {}
    for relay, result in zip(relays, results):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            report.sources.append((relay, _describe_error(result)))
            continue
        report.sources.append((relay, None))
        for event in result:
            ident = _tag_values(event.get("tags") or [], "d")
            label = f"{relay}: event {str(event.get('id'))[:12]}" + (f" ({ident[0]})" if ident else "")
            if event.get("kind") != ANNOUNCEMENT_KIND:
                continue
            if problem := check_signature(event):
                report.skipped.append(f"{label}: {problem}")
                continue
            try:
                announcement = parse_announcement(event, f"nostr {relay}")
            except ValueError as exc:
                report.skipped.append(f"{label}: malformed: {exc}")
                continue
            key = (str(event.get("pubkey")), announcement.provider_id)
            if key not in announcements or announcements[key].created_at < announcement.created_at:
                announcements[key] = announcement
    found = list(announcements.values())
    if directory:
        try:
            listed, skipped = parse_directory(await fetch_json(client, directory, timeout))
        except (MarketError, ValueError) as exc:
            report.sources.append((directory, str(exc)))
        else:
            report.sources.append((directory, None))
            report.skipped += skipped
            found += listed
    return found


async def probe(client: HttpClient, url: str, timeout: float) -> Probe:
    """A provider's `/v1/info` and `/v1/models`, read at once; latency is the model list's round trip."""
    started = time.perf_counter()

    async def timed_models() -> tuple[Any, float]:
        payload = await fetch_json(client, url + "/models", timeout)
        return payload, (time.perf_counter() - started) * 1000

    info, models = await asyncio.gather(fetch_json(client, url + "/info", timeout), timed_models(),
                                        return_exceptions=True)
    if isinstance(models, BaseException):
        if not isinstance(models, Exception):
            raise models
        return Probe(error=f"/v1/models: {_describe_error(models)}")
    payload, latency = models
    try:
        listing = parse_model_list(payload)
    except MarketError as exc:
        return Probe(error=str(exc), latency_ms=latency)
    name, mints = None, ()
    if isinstance(info, dict):
        name = info.get("name") if isinstance(info.get("name"), str) else None
        mints = tuple(m for m in info.get("mints") or [] if isinstance(m, str))
    return Probe(listing.models, mints, name, latency)


def config_name(name: str, taken: set[str]) -> str:
    """A provider name config.toml accepts, unlike any in `taken`."""
    base = _UNSAFE.sub("-", name).strip("-._") or "provider"
    candidate, number = base, 2
    while candidate in taken:
        candidate, number = f"{base}-{number}", number + 1
    taken.add(candidate)
    return candidate


async def discover(relays: Iterable[str], directory: str | None, timeout: float = 10.0,
                   taken: Iterable[str] = ()) -> Report:
    """Find providers and probe each one (every URL announced for the same provider once)."""
    report = Report()
    client = HttpClient(timeout)
    try:
        announcements = await gather_announcements(relays, directory, timeout, client, report)
        unique: dict[str, Announcement] = {}
        for announcement in announcements:
            unique.setdefault(announcement.urls[0], announcement)
        probes = await asyncio.gather(*(_probe_first(client, a.urls, timeout) for a in unique.values()))
    finally:
        await client.aclose()
    names = set(taken)
    for announcement, (url, result) in zip(unique.values(), probes):
        report.found.append(Found(config_name(announcement.name, names), url, announcement, result))
    return report


async def _probe_first(client: HttpClient, urls: Sequence[str], timeout: float) -> tuple[str, Probe]:
    """The first of a provider's URLs that answers (the first one's failure when none does)."""
    first = None
    for url in urls:
        result = await probe(client, url, timeout)
        if result.error is None:
            return url, result
        first = first or (url, result)
    return first


def price_key(found: Found, model: str) -> tuple[Decimal, float]:
    """Cheapest first: sats per 1k input plus output tokens, then the faster."""
    live = found.probe.models[model]
    return live.rates.input_per_1k + live.rates.output_per_1k, found.probe.latency_ms or 0.0
