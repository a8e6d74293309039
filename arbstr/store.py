"""The ledger: peewee models for reading, and one database thread that owns the connection.

Writes never block the proxy's event loop: `Ledger.record` only puts a row on a queue; the
database thread inserts rows in batches (one transaction each) and serves the rare reads
(stats, logs) in between. On close every accepted row is written before the thread ends.

Nothing accepted is dropped in silence: a batch the database refuses (disk full, file removed,
server down) stays in a bounded buffer in memory, overflows into an optional spill file, and is
retried until it is written; `health()` says whether the ledger is failing, how many rows wait
and how many were lost (only once memory and the spill file could take no more).

Money is stored as integer nanosats (10⁻⁹ sat) in columns named `*_nsats`: exact for every
Routstr price (whole msats billed; rates of fractions of a msat per token make estimates that
need finer units) and summable in SQL on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import peewee
from playhouse.shortcuts import ThreadSafeDatabaseMetadata

from arbstr.migrations import MIGRATIONS, migrate_database
from arbstr.estimator import RATIO_CLAMP, RATIO_WINDOW, learned_rows

if TYPE_CHECKING:
    from arbstr.config import Config

log = logging.getLogger("arbstr.store")

NANOSATS = Decimal(10) ** 9
T = TypeVar("T")


def to_nsats(sats: Decimal | None) -> int | None:
    return None if sats is None else int((Decimal(sats) * NANOSATS).to_integral_value(ROUND_HALF_UP))


def from_nsats(nsats: int | None) -> Decimal | None:
    return None if nsats is None else Decimal(int(nsats)) / NANOSATS


class _Base(peewee.Model):
    class Meta:
        # Bound per thread: each Ledger binds the models on its own database thread.
        model_metadata_class = ThreadSafeDatabaseMetadata


class RequestRow(_Base):
    """A request as stored (the schema itself is written by arbstr.migrations, never from here)."""

    request_id = peewee.CharField(max_length=64)
    timestamp = peewee.DoubleField()
    """Unix seconds (UTC) when the request arrived."""
    instance_id = peewee.CharField(max_length=255)
    """Which arbstr wrote the row: `[server] instance_id`."""
    policy = peewee.CharField(max_length=128)
    model = peewee.CharField(max_length=256)
    provider = peewee.CharField(max_length=128, null=True)
    input_tokens = peewee.IntegerField(null=True)
    output_tokens = peewee.IntegerField(null=True)
    cost_nsats = peewee.BigIntegerField(null=True)
    estimated_cost_nsats = peewee.BigIntegerField(null=True)
    next_best_cost_nsats = peewee.BigIntegerField(null=True)
    """What the next candidate that could have served would have charged for the same tokens."""
    max_cost_nsats = peewee.BigIntegerField(null=True)
    """What the dearest candidate that could have served would have charged for the same tokens."""
    cost_reported = peewee.BooleanField()
    """True when cost_nsats is the provider's own figure, False when computed from its rates."""
    latency_ms = peewee.DoubleField(null=True)
    ttft_ms = peewee.DoubleField(null=True)
    streaming = peewee.BooleanField()
    success = peewee.BooleanField()
    status_code = peewee.IntegerField(null=True)
    error = peewee.TextField(null=True)
    usage_estimated = peewee.BooleanField()
    attempts = peewee.TextField()
    app = peewee.CharField(max_length=128, null=True)
    """The app the request is attributed to (arbstr.attribution), None when nothing named one."""
    charge_diff_msats = peewee.BigIntegerField(null=True)
    """The reported charge minus what the advertised prices allow (pricing.check_charge)."""

    class Meta:
        table_name = "requests"


class OutputRatio(_Base):
    """A learned output/input token ratio of one (policy, model); model '*' pools every model."""

    policy = peewee.CharField(max_length=128)
    model = peewee.CharField(max_length=256)
    sample_count = peewee.IntegerField()
    mean = peewee.DoubleField()
    variance = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "output_ratios"
        primary_key = peewee.CompositeKey("policy", "model")


MODELS = [RequestRow, OutputRatio]


def redact_url(url: str) -> str:
    """A database URL fit for logs and errors: any password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def sqlite_path(url: str) -> str | None:
    """The file behind a SQLite URL; None for PostgreSQL and `:memory:`."""
    if url.startswith(("postgres://", "postgresql://")) or url == ":memory:":
        return None
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url


def open_database(url: str) -> peewee.Database:
    """`:memory:`, a file path, `sqlite:///path` or `postgresql://...` as a peewee database."""
    if url.startswith(("postgres://", "postgresql://")):
        from playhouse.db_url import connect
        # Without a connect timeout an unreachable server holds the writer for minutes.
        return connect(url, **({} if "connect_timeout" in url else {"connect_timeout": 5}))
    path = sqlite_path(url) or ":memory:"
    # WAL lets readers (arbstr stats in another process) read while the proxy writes.
    return peewee.SqliteDatabase(path, pragmas={"journal_mode": "wal", "synchronous": "normal",
                                                "busy_timeout": 5000}, check_same_thread=False)


def schema_applied(db: peewee.Database) -> list[str]:
    """The migrations recorded in the database, in the order they ran."""
    return [r[0] for r in db.execute_sql("SELECT name FROM arbstr_migrations").fetchall()
            if r[0] in {m.__name__ for m in MIGRATIONS}]


@dataclass(slots=True)
class RequestRecord:
    """One finished request, as the engine reports it to the ledger (money in Decimal sats).

    Not frozen, though nothing changes it once made (the ledger's thread reads it): every request
    makes one, and a frozen dataclass's __init__ (object.__setattr__ per field, 22 of them) cost
    more than the rest of settling it."""

    request_id: str
    timestamp: float
    policy: str
    model: str
    provider: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_sats: Decimal | None
    estimated_cost_sats: Decimal | None
    next_best_cost_sats: Decimal | None
    max_cost_sats: Decimal | None
    cost_reported: bool
    latency_ms: float | None
    ttft_ms: float | None
    streaming: bool
    success: bool
    status_code: int | None
    error: str | None
    usage_estimated: bool
    attempts: str
    app: str | None = None
    charge_diff_msats: int | None = None
    """The reported charge minus what the advertised prices allow, in msats; None when unchecked."""


RECORD_FIELDS = tuple(RequestRecord.__dataclass_fields__)
MONEY_FIELDS = ("cost_sats", "estimated_cost_sats", "next_best_cost_sats", "max_cost_sats")
COLUMNS = (*(f.removesuffix("_sats") + "_nsats" if f in MONEY_FIELDS else f for f in RECORD_FIELDS), "instance_id")
"""The `requests` columns a record fills, in RECORD_FIELDS order, then the writer's instance."""
INSERT_ROWS = 1 << (30_000 // len(COLUMNS)).bit_length() - 1
"""The most rows an INSERT statement holds: a power of two within SQLite's 32,766 parameters a
statement (PostgreSQL's 65,535)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One observed output/input ratio, for the learned ratios of `estimator.learned_rows(policy, model)`."""

    policy: str
    model: str
    ratio: float
    at: float


@dataclass(frozen=True, slots=True)
class Learned:
    """A learned ratio: mean and variance (a running one over the first RATIO_WINDOW samples, then
    exponential over about that many), and how many samples it has seen."""

    mean: float
    variance: float
    count: int


@dataclass(frozen=True, slots=True)
class LedgerHealth:
    state: Literal["ok", "failing"]
    backlog: int
    """Rows accepted and not yet written (in memory and in the spill file)."""
    rows_lost: int
    """Rows given up for good since start: the buffer was full and no spill file could take them."""

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "backlog": self.backlog, "rows_lost": self.rows_lost}


def _learn_sql(param: str) -> str:
    """One atomic upsert per sample, computed by the database from the row as it is at that moment,
    so instances sharing the database lose no sample. The same arithmetic as
    `estimator.update_ratio` (clamp from the fourth sample, window RATIO_WINDOW), plus the
    variance: `var' = (var + d²/k)·(k-1)/k` with `k = min(count+1, window)`, which is Welford's
    population variance while k grows and an exponential variance after."""
    mean, count, variance, sample = "output_ratios.mean", "output_ratios.sample_count", \
        "output_ratios.variance", "excluded.mean"
    clamped = (f"(CASE WHEN {count} >= 3 AND {mean} > 0 THEN (CASE WHEN {sample} < {mean} / {RATIO_CLAMP} "
               f"THEN {mean} / {RATIO_CLAMP} WHEN {sample} > {mean} * {RATIO_CLAMP} THEN {mean} * {RATIO_CLAMP} "
               f"ELSE {sample} END) ELSE {sample} END)")
    k = f"(CASE WHEN {count} + 1 < {RATIO_WINDOW} THEN {count} + 1 ELSE {RATIO_WINDOW} END)"
    delta = f"({clamped} - {mean})"
    return ("INSERT INTO output_ratios (policy, model, sample_count, mean, variance, updated_at) "
            f"VALUES ({param}, {param}, 1, {param}, 0, {param}) ON CONFLICT (policy, model) DO UPDATE SET "
            f"sample_count = {count} + 1, mean = {mean} + {delta} / {k}, "
            f"variance = ({variance} + {delta} * {delta} / {k}) * ({k} - 1) / {k}, "
            "updated_at = excluded.updated_at")


def apply_sample(count: int, mean: float, variance: float, sample: float) -> tuple[int, float, float]:
    """What `_learn_sql`'s upsert makes of a row (count, mean, variance) and one more sample: the
    same operations in the same order on the same doubles, so the same figures to the last bit."""
    if count >= 3 and mean > 0:
        if sample < mean / RATIO_CLAMP:
            sample = mean / RATIO_CLAMP
        elif sample > mean * RATIO_CLAMP:
            sample = mean * RATIO_CLAMP
    k = count + 1 if count + 1 < RATIO_WINDOW else RATIO_WINDOW
    delta = sample - mean
    return count + 1, mean + delta / k, (variance + delta * delta / k) * (k - 1) / k


class LedgerFileGone(Exception):
    """The SQLite file was removed or replaced under the open connection: what it takes is lost."""


_STOP = object()
_WRITES = (RequestRecord, Sample)
"""What the writer writes; anything else on its queue is a read (function, future) or _STOP."""
Row = list
"""A request row as the INSERT takes it: values in COLUMNS order."""


class Ledger:
    """The database behind arbstr, used from any thread; all access happens on its own thread."""

    BATCH = 500
    RETRY_FIRST, RETRY_MAX = 0.25, 5.0
    """Seconds before the first retry of a failed write, doubling up to the max."""
    CLOSE_RETRY = 3.0
    """Seconds close() keeps retrying a failing database before it spills or gives up the backlog."""

    def __init__(self, url: str, flush_interval: float = 0.05, *, instance_id: str = "",
                 buffer_rows: int = 50_000, spill_path: str | None = None, reload_interval: float = 5.0) -> None:
        self.url = url
        self.flush_interval = flush_interval
        """Seconds the writer lets rows gather after the first one before it writes them all at
        once; 0 writes (and commits) each batch as soon as it arrives."""
        self.instance_id = instance_id
        self.buffer_rows = buffer_rows
        self.spill_path = spill_path
        self.reload_interval = reload_interval
        """Seconds between reloads of the learned ratios, which other instances also update."""
        self.learned: dict[tuple[str, str], Learned] = {}
        """Every learned ratio as last loaded: {(policy, model): Learned}; replaced whole on reload."""
        self.learned_version = 0
        """Goes up by one each time `learned` is replaced."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        """Set when the writer must not wait out the flush interval: a read, or close()."""
        self._ready: Future[None] = Future()
        self._closed = False
        self._backlog: deque[Row | Sample] = deque()
        self._backlog_rows = 0
        self._spilled = 0
        self._lost = 0
        self._failing_since: float | None = None
        self._lost_logged = False
        self._retry_delay = self.RETRY_FIRST
        self._retry_at = 0.0
        self._reload_at = 0.0
        self._file = sqlite_path(url)
        self._identity: tuple[int, int] | None = None
        self._reopen = False
        self._late: list[Any] = []
        self._thread = threading.Thread(target=self._run, name="arbstr-ledger", daemon=True)
        self._thread.start()
        self._ready.result()

    @classmethod
    def from_config(cls, config: Config) -> Ledger:
        database = config.database
        return cls(database.path, database.flush_interval, instance_id=config.server.instance,
                   buffer_rows=database.buffer_rows, spill_path=database.spill_path,
                   reload_interval=database.reload_interval)

    def record(self, record: RequestRecord) -> None:
        """Accept a row for writing; never blocks on the database."""
        self._queue.put(record)

    def queue_depth(self) -> int:
        """Rows and reads accepted and not yet handled by the writer (approximate while it runs)."""
        return self._queue.qsize()

    def learn(self, policy: str, model: str, ratio: float) -> None:
        """Count one observed output/input ratio for (policy, model) and, for a policy, (policy, '*')
        (`estimator.learned_rows`), in the database itself with the next batch; never waits."""
        self._queue.put(Sample(policy, model, ratio, time.time()))

    def load_learning(self) -> dict[tuple[str, str], Learned]:
        """Every learned ratio as the database has it now (waits for the rows queued before)."""
        return self.call(self._read_learning)

    def health(self) -> LedgerHealth:
        return LedgerHealth("failing" if self._failing_since is not None else "ok",
                            self._backlog_rows + self._spilled, self._lost)

    @property
    def rows_lost(self) -> int:
        """Request rows given up for good (the buffer full and no spill file could take them)."""
        return self._lost

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the database thread (after the rows queued before it) and return its result."""
        return self.submit(function).result()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        """Like `call`, without waiting: the proxy awaits the future with asyncio.wrap_future."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        future: Future[T] = Future()
        self._queue.put((function, future))
        self._wake.set()
        return future

    def close(self) -> None:
        """Write every accepted row (retrying a failing database a little while), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join()

    # The database thread.

    def _run(self) -> None:
        try:
            self.db = open_database(self.url)
            self.db.bind(MODELS)
            self._insert_sql: dict[int, str] = {}
            self._upsert_sql = _learn_sql(self.db.param)
            param = self.db.param
            self._read_ratio_sql = ("SELECT sample_count, mean, variance FROM output_ratios "
                                    f"WHERE policy = {param} AND model = {param}")
            self._write_ratio_sql = (f"UPDATE output_ratios SET sample_count = {param}, mean = {param}, "
                                     f"variance = {param}, updated_at = {param} "
                                     f"WHERE policy = {param} AND model = {param}")
            self._read_record = operator.attrgetter(*RECORD_FIELDS)
            self._money = [RECORD_FIELDS.index(name) for name in MONEY_FIELDS]
            self._open()
            self._spilled = self._count_spilled()
            self._replay_spill()
            self._reload_learning()
        except Exception as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while True:
            if not self._process(self._next_items()):
                break
            self._on_timers()
        self._finish()

    def _open(self) -> None:
        self.db.connect(reuse_if_open=True)
        migrate_database(self.db)
        self._identity = self._file_identity()
        self._reopen = False

    def _file_identity(self) -> tuple[int, int] | None:
        if self._file is None:
            return None
        try:
            found = os.stat(self._file)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def _check_file(self) -> None:
        if self._file is not None and self._file_identity() != self._identity:
            raise LedgerFileGone(f"the database file {self._file} was removed or replaced")

    def _next_items(self) -> list[Any]:
        """What the queue holds, after letting a batch gather; nothing once a timer is due."""
        due = [t for t in (self._retry_at if self._failing_since is not None else None,
                           self._reload_at if self.reload_interval else None) if t is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if isinstance(first, _WRITES) and self.flush_interval and self._failing_since is None:
            # Let a batch gather: one wake-up and one transaction for many rows, not one each
            # (a wake-up per row cost the event loop GIL time). Reads and close() cut it short.
            self._wake.wait(self.flush_interval)
        self._wake.clear()
        return [first, *self._drain()]

    def _drain(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _process(self, items: list[Any]) -> bool:
        """Write the rows and serve the reads, in the order they came; False once told to stop."""
        writes: list[RequestRecord | Sample] = []
        for index, item in enumerate(items):
            if isinstance(item, _WRITES):
                writes.append(item)
                continue
            self._accept(writes)
            writes = []
            if item is _STOP:
                self._late = items[index + 1:]
                return False
            self._serve(*item)
        self._accept(writes)
        return True

    def _accept(self, writes: list[RequestRecord | Sample]) -> None:
        if not writes:
            return
        for item in writes:
            if isinstance(item, RequestRecord):
                self._backlog.append(self._row_values(item))
                self._backlog_rows += 1
            else:
                self._backlog.append(item)
        if self._failing_since is None:
            self._flush()
        else:
            self._bound_backlog()

    def _row_values(self, record: RequestRecord) -> Row:
        # Only money needs converting (Decimal sats to integer nanosats); the other fields already
        # hold what both drivers take (str, int, float, bool, None), and peewee's per-field
        # conversion of them was most of the writer's Python time, held under the GIL.
        values = list(self._read_record(record))
        for index in self._money:
            values[index] = to_nsats(values[index])
        values.append(self.instance_id)
        return values

    def _flush(self) -> None:
        """Write the backlog, oldest first, BATCH at a time; on a failure keep what is left for a retry."""
        try:
            if self._reopen:
                self._open()
            while self._backlog:
                chunk = list(itertools.islice(self._backlog, self.BATCH))
                self._write(chunk)
                for _ in chunk:
                    self._backlog.popleft()
                self._backlog_rows -= sum(1 for item in chunk if isinstance(item, list))
            if self._spilled:
                self._replay_spill()
        except Exception as exc:
            self._failed(exc)
            return
        if self._failing_since is not None:
            log.warning("the ledger writes again: every kept row is written (failing for %.1f s, %d rows lost)",
                        time.monotonic() - self._failing_since, self._lost)
            self._failing_since = None
            self._lost_logged = False
            self._retry_delay = self.RETRY_FIRST

    def _write(self, chunk: list[Row | Sample], skip_ids: bool = False) -> None:
        """One transaction: the rows, and each sample into its model's ratio and its policy's pooled one."""
        rows = [item for item in chunk if isinstance(item, list)]
        samples = [item for item in chunk if isinstance(item, Sample)]
        self._check_file()
        with self.db.atomic():
            if skip_ids and rows:
                rows = self._not_yet_written(rows)
            if rows:
                self._insert(rows)
            if samples:
                self._learn_samples(samples)
        # A commit into a file that was removed meanwhile went nowhere anyone can read: keep the rows.
        self._check_file()

    def _insert(self, rows: list[Row]) -> None:
        """The rows in a few multi-row INSERT statements rather than `executemany` of a one-row
        one: the driver lets go of the GIL around each statement it runs, and taking it back means
        waiting for the event loop to hand it over, so a batch written row by row cost the event
        loop a GIL hand-over per row (bench/proxy.py: about 15% less CPU per request and 10% more
        req/s this way). Statements come in power-of-two sizes up to INSERT_ROWS (70 rows: 64, 4
        and 2), so a handful of them, prepared once, serve every batch."""
        cursor = self.db.cursor()
        start = 0
        while start < len(rows):
            count = min(INSERT_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
            sql = self._insert_sql.get(count)
            if sql is None:
                one = "(%s)" % ", ".join([self.db.param] * len(COLUMNS))
                sql = self._insert_sql[count] = \
                    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES {', '.join([one] * count)}"
            cursor.execute(sql, [value for row in rows[start:start + count] for value in row])
            start += count

    def _learn_samples(self, samples: list[Sample]) -> None:
        """Each sample into its rows (`estimator.learned_rows`), in order, as one atomic
        upsert per sample would leave them, with three statements per row instead of one per sample
        (a batch holds dozens of samples for the same few rows; each upsert cost as much as the
        request's own row). A row's first sample goes in by the upsert itself, which also locks the
        row (PostgreSQL) or the database (SQLite) until the commit, so no other instance can change
        it in between; the rest are applied to what the upsert left (`apply_sample`, the upsert's
        arithmetic) and written back at once."""
        by_row: dict[tuple[str, str], list[Sample]] = {}
        for sample in samples:
            for row in learned_rows(sample.policy, sample.model):
                by_row.setdefault(row, []).append(sample)
        cursor = self.db.cursor()
        cursor.executemany(self._upsert_sql, [(policy, model, first.ratio, first.at)
                                              for (policy, model), (first, *_) in by_row.items()])
        updates = []
        for (policy, model), (_, *rest) in by_row.items():
            if not rest:
                continue
            cursor.execute(self._read_ratio_sql, (policy, model))
            count, mean, variance = cursor.fetchone()
            for sample in rest:
                count, mean, variance = apply_sample(count, mean, variance, sample.ratio)
            updates.append((count, mean, variance, rest[-1].at, policy, model))
        if updates:
            cursor.executemany(self._write_ratio_sql, updates)

    def _not_yet_written(self, rows: list[Row]) -> list[Row]:
        """Rows whose request_id is not in the table yet: replaying a spill file twice adds nothing."""
        ids = [row[0] for row in rows]
        marks = ", ".join([self.db.param] * len(ids))
        present = {r[0] for r in self.db.execute_sql(
            f"SELECT request_id FROM requests WHERE request_id IN ({marks})", ids).fetchall()}
        return [row for row in rows if row[0] not in present]

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._retry_delay = self.RETRY_FIRST
            # A failed commit's rollback may fail too ("no transaction is active"): the first error says why.
            reason = exc.__context__ if exc.__context__ is not None else exc
            log.error("the ledger cannot write to %s: %s; %d rows are kept and retried",
                      redact_url(self.url), redact_url(str(reason)).strip(), self._backlog_rows + self._spilled)
        else:
            self._retry_delay = min(self._retry_delay * 2, self.RETRY_MAX)
        self._retry_at = now + self._retry_delay
        # Whatever the failure left of the connection is dropped; the retry opens a new one (and
        # creates the schema again if the file itself is new).
        try:
            self.db.close()
        except Exception:  # a broken connection may fail to close: it is gone either way
            pass
        self._reopen = True
        self._bound_backlog()

    def _bound_backlog(self) -> None:
        """Keep at most buffer_rows rows in memory; the newest beyond go to the spill file, else are lost."""
        if self._backlog_rows <= self.buffer_rows:
            return
        overflow: list[Row] = []
        while self._backlog_rows - len(overflow) > self.buffer_rows:
            item = self._backlog.pop()
            if isinstance(item, list):
                overflow.append(item)
            # A learning sample past the bound is let go: it is not money, and the ratio lives without it.
        self._backlog_rows -= len(overflow)
        overflow.reverse()
        self._spill(overflow)

    def _spill(self, rows: list[Row]) -> None:
        if self.spill_path:
            try:
                with open(self.spill_path, "a", encoding="utf-8") as spill:
                    spill.write("".join(json.dumps(row) + "\n" for row in rows))
                    spill.flush()
                    os.fsync(spill.fileno())
                self._spilled += len(rows)
                return
            except OSError as exc:
                reason = f"the spill file {self.spill_path} cannot take them: {exc}"
        else:
            reason = "no [database] spill_path is set"
        self._lost += len(rows)
        if not self._lost_logged:
            self._lost_logged = True
            log.error("the ledger is losing rows: its buffer of %d rows is full and %s", self.buffer_rows, reason)

    def _count_spilled(self) -> int:
        if not self.spill_path or not os.path.exists(self.spill_path):
            return 0
        with open(self.spill_path, encoding="utf-8") as spill:
            return sum(1 for line in spill if line.strip())

    def _replay_spill(self) -> None:
        """Write the rows of the spill file (skipping any already written) and empty it."""
        if not self._spilled:
            return
        with open(self.spill_path, encoding="utf-8") as spill:
            rows = []
            for line in spill:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a crash while spilling
                    if line.strip():
                        self._lost += 1
                        log.error("the ledger's spill file holds an unreadable line; that row is lost")
        for start in range(0, len(rows), self.BATCH):
            self._write(rows[start:start + self.BATCH], skip_ids=True)
        os.unlink(self.spill_path)
        log.warning("the ledger wrote %d rows back from its spill file %s", len(rows), self.spill_path)
        self._spilled = 0

    def _on_timers(self) -> None:
        now = time.monotonic()
        if self._failing_since is not None and now >= self._retry_at:
            self._flush()
        if self.reload_interval and now >= self._reload_at and self._failing_since is None:
            try:
                # A removed file shows in /health now, not only once a row fails to go in.
                self._check_file()
            except LedgerFileGone as exc:
                self._failed(exc)
                return
            try:
                self._reload_learning()
            except Exception as exc:  # the next write finds out whether the database is really gone
                log.debug("could not reload learned ratios: %s", exc)
                self._reload_at = now + self.reload_interval

    def _reload_learning(self) -> None:
        self.learned = self._read_learning()
        self.learned_version += 1
        self._reload_at = time.monotonic() + self.reload_interval

    @staticmethod
    def _read_learning() -> dict[tuple[str, str], Learned]:
        return {(r.policy, r.model): Learned(r.mean, r.variance, r.sample_count) for r in OutputRatio.select()}

    def _finish(self) -> None:
        """On close: write what is left, retrying a failing database a little; then spill or count the rest."""
        late = self._late + self._drain()
        self._accept([item for item in late if isinstance(item, _WRITES)])
        for item in late:
            if isinstance(item, tuple):
                item[1].set_exception(RuntimeError("the ledger is closed"))
        deadline = time.monotonic() + self.CLOSE_RETRY
        while self._failing_since is not None and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
            self._flush()
        if self._backlog_rows:
            rows = [item for item in self._backlog if isinstance(item, list)]
            self._backlog.clear()
            self._backlog_rows = 0
            lost_before = self._lost
            self._spill(rows)
            lost = self._lost - lost_before
            log.error("the ledger closed with %d rows unwritten: %s", len(rows),
                      f"{lost} lost" if lost else f"they wait in {self.spill_path} for the next start")
        try:
            self.db.close()
        except Exception:
            pass

    @staticmethod
    def _serve(function: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting (asyncio cancelled it) before it ran: nothing to do
        try:
            future.set_result(function())
        except BaseException as exc:  # the caller gets the error, the thread goes on
            future.set_exception(exc)

