"""Reading the ledger back: totals, savings and latency percentiles, and pages of request rows.

The functions here run on the ledger's database thread (`Ledger.call`); the local API and the
CLI share them, so `GET /v1/stats` and `arbstr stats` always agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from arbstr.errors import InvalidRequest
from arbstr.pricing import CHARGE_TOLERANCE_MSATS, exact_sats
from arbstr.store import RequestRow, from_nsats

RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7),
          "30d": timedelta(days=30), "all": None}
GROUPS = ("provider", "model", "policy", "app", "instance_id")
FILTERS = ("model", "provider", "policy", "app", "instance_id")
MAX_PAGE = 500
BUCKETS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "1d": 86400}
"""Time-series bucket lengths in seconds, for `/v1/stats?bucket=`."""
MAX_BUCKETS = 2000
MAX_OFFSET = 10**12


@dataclass(frozen=True, slots=True)
class Window:
    """Which rows a query covers: a time window and exact-match filters."""

    since: float | None = None
    until: float | None = None
    filters: tuple[tuple[str, str], ...] = ()

    def where(self) -> list[Any]:
        clauses = [getattr(RequestRow, name) == value for name, value in self.filters]
        if self.since is not None:
            clauses.append(RequestRow.timestamp >= self.since)
        if self.until is not None:
            clauses.append(RequestRow.timestamp < self.until)
        return clauses

    def describe(self) -> dict[str, Any]:
        return {"since": iso_time(self.since), "until": iso_time(self.until), "filters": dict(self.filters)}


def parse_window(params: Mapping[str, str], now: float) -> Window:
    """`range` or `since`/`until` (ISO 8601) and filters, from query parameters; InvalidRequest when bad."""
    since = until = None
    if "range" in params:
        if params["range"] not in RANGES:
            raise InvalidRequest(f"range must be one of {', '.join(RANGES)}, not '{params['range']}'.",
                                 code="invalid_range", details={"param": "range"})
        span = RANGES[params["range"]]
        since = now - span.total_seconds() if span else None
    if "since" in params:
        since = _parse_time(params["since"], "since")
    if "until" in params:
        until = _parse_time(params["until"], "until")
    if since is not None and until is not None and until <= since:
        raise InvalidRequest("until must be later than since.", code="invalid_range", details={"param": "until"})
    filters = tuple((name, params[name]) for name in FILTERS if params.get(name))
    return Window(since, until, filters)


def parse_group(params: Mapping[str, str]) -> str | None:
    return _parse_choice(params, "group_by", GROUPS)


def parse_bucket(params: Mapping[str, str]) -> str | None:
    return _parse_choice(params, "bucket", tuple(BUCKETS))


def _parse_choice(params: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    value = params.get(name)
    if value is not None and value not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}, not '{value}'.",
                             code=f"invalid_{name}", details={"param": name})
    return value


def _parse_time(text: str, name: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 time such as 2026-11-23T09:00:00Z, not '{text}'.",
                             code="invalid_time", details={"param": name}) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso_time(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def summarize(rows: list[tuple]) -> dict[str, Any]:
    """Totals of rows of `_SUMMARY_COLUMNS` (success, streaming, usage_estimated, in, out, cost, next_best,
    most_expensive, latency, ttft, estimate, ...)."""
    successes = [r for r in rows if r[0]]
    cost = sum((r[5] for r in successes if r[5] is not None), Decimal(0))
    saved_next = sum((r[6] - r[5] for r in successes if r[5] is not None and r[6] is not None), Decimal(0))
    saved_max = sum((r[7] - r[5] for r in successes if r[5] is not None and r[7] is not None), Decimal(0))
    latencies = sorted(r[8] for r in successes if r[8] is not None)
    ttfts = sorted(r[9] for r in successes if r[9] is not None)
    estimated = [r for r in successes if r[5] is not None and r[10] is not None]
    checked = [r for r in rows if r[_CHARGE_DIFF] is not None]
    overcharged = [r for r in checked if r[_CHARGE_DIFF] > CHARGE_TOLERANCE_MSATS]
    return {
        "requests": len(rows), "successes": len(successes), "errors": len(rows) - len(successes),
        "streaming": sum(1 for r in rows if r[1]), "usage_estimated": sum(1 for r in rows if r[2]),
        "input_tokens": sum(r[3] or 0 for r in rows), "output_tokens": sum(r[4] or 0 for r in rows),
        "cost_sats": exact_sats(cost), "saved_vs_next_best_sats": exact_sats(saved_next),
        "saved_vs_most_expensive_sats": exact_sats(saved_max),
        "latency_ms": {"p50": percentile(latencies, 0.50), "p95": percentile(latencies, 0.95),
                       "p99": percentile(latencies, 0.99)},
        "ttft_ms": {"p50": percentile(ttfts, 0.50), "p95": percentile(ttfts, 0.95)},
        # The router's estimates against what the same requests cost: how good its choices are.
        "estimate_vs_actual": {"requests": len(estimated),
                               "estimated_sats": exact_sats(sum((r[10] for r in estimated), Decimal(0))),
                               "actual_sats": exact_sats(sum((r[5] for r in estimated), Decimal(0)))},
        # Reported charges against the advertised prices (pricing.check_charge).
        "charges": {"checked": len(checked), "overcharged": len(overcharged),
                    "overcharged_msats": sum(r[_CHARGE_DIFF] for r in overcharged)},
    }


_SUMMARY_COLUMNS = (RequestRow.success, RequestRow.streaming, RequestRow.usage_estimated, RequestRow.input_tokens,
                    RequestRow.output_tokens, RequestRow.cost_nsats, RequestRow.next_best_cost_nsats,
                    RequestRow.max_cost_nsats, RequestRow.latency_ms, RequestRow.ttft_ms,
                    RequestRow.estimated_cost_nsats, RequestRow.timestamp, RequestRow.provider,
                    RequestRow.charge_diff_msats)
_NSATS_INDEXES = (5, 6, 7, 10)
_TIMESTAMP, _PROVIDER, _CHARGE_DIFF = 11, 12, 13


def compute_stats(window: Window, group_by: str | None = None, bucket: str | None = None,
                  now: float | None = None) -> dict[str, Any]:
    """Totals over the window, per group when asked, and a time series per provider when a bucket
    is given. Runs on the ledger thread."""
    columns = list(_SUMMARY_COLUMNS) + ([getattr(RequestRow, group_by)] if group_by else [])
    query = RequestRow.select(*columns)
    for clause in window.where():
        query = query.where(clause)
    rows = [_converted(r) for r in query.tuples().iterator()]
    result: dict[str, Any] = {"window": window.describe(), "totals": summarize(rows)}
    if group_by:
        groups: dict[str, list[tuple]] = {}
        for row in rows:
            groups.setdefault(row[-1] or "", []).append(row)
        result["group_by"] = group_by
        result["groups"] = [{group_by: key, **summarize(members)} for key, members in sorted(groups.items())]
    if bucket:
        result["series"] = time_series(rows, window, bucket, time.time() if now is None else now)
    return result


def time_series(rows: list[tuple], window: Window, bucket: str, now: float) -> dict[str, Any]:
    """Requests, errors, spend and savings per time bucket, in total and per provider (spend, for
    a chart stacked by provider). Buckets are aligned to whole multiples of their length in Unix
    time, from the window's start (or the first row) to its end (or now), empty ones included."""
    size = BUCKETS[bucket]
    first = window.since if window.since is not None else min((r[_TIMESTAMP] for r in rows), default=now)
    start = int(first // size * size)
    count = int((window.until if window.until is not None else now) - start) // size + 1
    if count > MAX_BUCKETS:
        raise InvalidRequest(f"bucket {bucket} makes {count} points over this range; at most {MAX_BUCKETS}: "
                             "choose a larger bucket or a shorter range.", code="invalid_bucket",
                             details={"param": "bucket"})
    zero = Decimal(0)
    requests, errors = [0] * count, [0] * count
    spent, saved_next, saved_max = [zero] * count, [zero] * count, [zero] * count
    by_provider: dict[str, list[Decimal]] = {}
    for row in rows:
        index = int(row[_TIMESTAMP] - start) // size
        if not 0 <= index < count:
            continue
        requests[index] += 1
        cost = row[5]
        if not row[0]:
            errors[index] += 1
        elif cost is not None:
            spent[index] += cost
            by_provider.setdefault(row[_PROVIDER] or "", [zero] * count)[index] += cost
            if row[6] is not None:
                saved_next[index] += row[6] - cost
            if row[7] is not None:
                saved_max[index] += row[7] - cost
    return {
        "bucket": bucket, "bucket_seconds": size, "start": [start + i * size for i in range(count)],
        "requests": requests, "errors": errors, "cost_sats": [exact_sats(v) for v in spent],
        "saved_vs_next_best_sats": [exact_sats(v) for v in saved_next],
        "saved_vs_most_expensive_sats": [exact_sats(v) for v in saved_max],
        "cost_sats_by_provider": {name: [exact_sats(v) for v in values]
                                  for name, values in sorted(by_provider.items())},
    }


def _converted(row: tuple) -> tuple:
    """The money columns (integer nanosats) as Decimal sats."""
    return tuple(from_nsats(v) if i in _NSATS_INDEXES else v for i, v in enumerate(row))


REQUEST_FIELDS = ("request_id", "timestamp", "instance_id", "policy", "model", "provider", "input_tokens",
                  "output_tokens", "cost_reported", "latency_ms", "ttft_ms", "streaming", "success", "status_code",
                  "error", "usage_estimated", "attempts", "app", "charge_diff_msats")
MONEY = {"cost_sats": "cost_nsats", "estimated_cost_sats": "estimated_cost_nsats",
         "next_best_cost_sats": "next_best_cost_nsats", "max_cost_sats": "max_cost_nsats"}
"""Amounts in the API (exact decimal-string sats) and the columns (integer nanosats) they come from."""


def list_requests(window: Window, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """A page of rows, newest first. Runs on the ledger thread."""
    query = RequestRow.select()
    for clause in window.where():
        query = query.where(clause)
    total = query.count()
    page = query.order_by(RequestRow.timestamp.desc(), RequestRow.id.desc()).limit(limit).offset(offset)
    data = []
    for row in page:
        item = {name: getattr(row, name) for name in REQUEST_FIELDS}
        item["timestamp"] = iso_time(row.timestamp)
        for name, column in MONEY.items():
            nsats = getattr(row, column)
            item[name] = None if nsats is None else exact_sats(from_nsats(nsats))
        data.append(item)
    return {"object": "list", "data": data, "total": total, "limit": limit, "offset": offset,
            "window": window.describe()}


def parse_page(params: Mapping[str, str]) -> tuple[int, int]:
    values = []
    for name, default, low, top in (("limit", 50, 1, MAX_PAGE), ("offset", 0, 0, MAX_OFFSET)):
        text = params.get(name, str(default))
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= top:
            bound = f"from {low} to {top}"
            raise InvalidRequest(f"{name} must be a whole number {bound}, not '{text}'.",
                                 code=f"invalid_{name}", details={"param": name})
        values.append(int(text))
    return values[0], values[1]

