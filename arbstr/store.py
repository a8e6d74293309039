"""The ledger: peewee models, numbered migrations, and one database thread that owns the connection.

Writes never block the proxy's event loop: `Ledger.record` only puts a row on a queue; the
database thread inserts rows in batches (one transaction each) and serves the rare reads
(stats, logs) in between. On close every accepted row is written before the thread ends.

Money is stored as integer nanosats (1e-9 sat) in `SatsField`, exact for every Routstr price
(msats and fractions of a sat per token) and summable in SQL on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import logging
import operator
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

import peewee
from playhouse.shortcuts import ThreadSafeDatabaseMetadata

log = logging.getLogger("arbstr.store")

NANOSATS = Decimal(10) ** 9
T = TypeVar("T")



class SatsField(peewee.BigIntegerField):
    """Decimal sats in Python, integer nanosats in the database."""

    def db_value(self, value: Decimal | None) -> int | None:
        if value is None:
            return None
        return int((Decimal(value) * NANOSATS).to_integral_value(ROUND_HALF_UP))

    def python_value(self, value: int | None) -> Decimal | None:
        return None if value is None else Decimal(int(value)) / NANOSATS


class _Base(peewee.Model):
    class Meta:
        # Bound per thread: each Ledger binds the models on its own database thread.
        model_metadata_class = ThreadSafeDatabaseMetadata


class RequestRow(_Base):
    request_id = peewee.CharField(max_length=64, index=True)
    timestamp = peewee.DoubleField(index=True)
    """Unix seconds (UTC) when the request arrived."""
    policy = peewee.CharField(max_length=128, default="")
    model = peewee.CharField(max_length=256, default="", index=True)
    provider = peewee.CharField(max_length=128, null=True, index=True)
    input_tokens = peewee.IntegerField(null=True)
    output_tokens = peewee.IntegerField(null=True)
    cost_sats = SatsField(null=True)
    estimated_cost_sats = SatsField(null=True)
    next_best_cost_sats = SatsField(null=True)
    """What the next candidate of the plan would have charged for the same tokens."""
    max_cost_sats = SatsField(null=True)
    """What the most expensive eligible provider would have charged for the same tokens."""
    cost_reported = peewee.BooleanField(default=False)
    """True when cost_sats is the provider's own figure, False when computed from its rates."""
    latency_ms = peewee.DoubleField(null=True)
    ttft_ms = peewee.DoubleField(null=True)
    streaming = peewee.BooleanField(default=False)
    success = peewee.BooleanField(default=False)
    status_code = peewee.IntegerField(null=True)
    error = peewee.TextField(null=True)
    usage_estimated = peewee.BooleanField(default=False)
    attempts = peewee.TextField(default="")
    app = peewee.CharField(max_length=128, null=True, index=True)
    """The app the request is attributed to (arbstr.attribution), None when nothing named one."""

    class Meta:
        table_name = "requests"


class TokenRatio(_Base):
    policy = peewee.CharField(max_length=128, unique=True)
    avg_ratio = peewee.DoubleField()
    sample_count = peewee.IntegerField()

    class Meta:
        table_name = "token_ratios"


class SchemaVersion(_Base):
    version = peewee.IntegerField()

    class Meta:
        table_name = "arbstr_schema"


def _migration_1(db: peewee.Database) -> None:
    """The first schema: requests and learned ratios, as the seeds had them."""
    db.execute_sql(
        "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, timestamp REAL NOT NULL, "
        "policy VARCHAR(128), model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, "
        "output_tokens INTEGER, cost_sats BIGINT, latency_ms REAL, success BOOLEAN, error TEXT)"
        if isinstance(db, peewee.SqliteDatabase) else
        "CREATE TABLE IF NOT EXISTS requests (id SERIAL PRIMARY KEY, timestamp DOUBLE PRECISION NOT NULL, "
        "policy VARCHAR(128), model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, "
        "output_tokens INTEGER, cost_sats BIGINT, latency_ms DOUBLE PRECISION, success BOOLEAN, error TEXT)")
    db.execute_sql(
        "CREATE TABLE IF NOT EXISTS token_ratios (id %s PRIMARY KEY, policy VARCHAR(128) NOT NULL UNIQUE, "
        "avg_ratio %s NOT NULL, sample_count INTEGER NOT NULL)"
        % (("INTEGER", "REAL") if isinstance(db, peewee.SqliteDatabase) else ("SERIAL", "DOUBLE PRECISION")))


def _migration_2(db: peewee.Database) -> None:
    """Estimates, savings, streaming facts and error detail on every request."""
    from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate
    migrator = SqliteMigrator(db) if isinstance(db, peewee.SqliteDatabase) else PostgresqlMigrator(db)
    existing = {c.name for c in db.get_columns("requests")}
    fields = RequestRow._meta.fields
    added = [name for name in ("request_id", "estimated_cost_sats", "next_best_cost_sats", "max_cost_sats",
                               "cost_reported", "ttft_ms", "streaming", "status_code", "usage_estimated",
                               "attempts") if name not in existing]
    operations = []
    for name in added:
        field = fields[name]
        if not field.null and field.default is None:
            field = peewee.CharField(max_length=64, default="")
        operations.append(migrator.add_column("requests", name, field))
    migrate(*operations)
    db.execute_sql("CREATE INDEX IF NOT EXISTS requests_timestamp ON requests (timestamp)")
    db.execute_sql("CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id)")


def _migration_3(db: peewee.Database) -> None:
    """The app each request is attributed to, for spend per app."""
    db.execute_sql("ALTER TABLE requests ADD COLUMN app VARCHAR(128)")
    db.execute_sql("CREATE INDEX IF NOT EXISTS requests_app ON requests (app)")


MODELS = [RequestRow, TokenRatio, SchemaVersion]

MIGRATIONS: list[Callable[[peewee.Database], None]] = [_migration_1, _migration_2, _migration_3]
"""Numbered from 1: the database records the last one applied. Append, never edit."""


def schema_version(db: peewee.Database) -> int:
    if not db.table_exists("arbstr_schema"):
        # A database from before versioning that already has the seeds' tables is at version 1.
        return 1 if db.table_exists("requests") else 0
    row = SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar()
    return row or 0


def migrate_database(db: peewee.Database) -> int:
    """Bring the schema up to date in place, keeping every row; returns the version reached."""
    with db.atomic():
        SchemaVersion.create_table(safe=True)
        current = schema_version(db)
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number > current:
                migration(db)
                SchemaVersion.insert(version=number).execute()
                log.info("database migrated to schema %d", number)
        return len(MIGRATIONS)


def redact_url(url: str) -> str:
    """A database URL fit for logs and errors: any password replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_database(url: str) -> peewee.Database:
    """`:memory:`, a file path, `sqlite:///path` or `postgresql://...` as a peewee database."""
    if url.startswith(("postgres://", "postgresql://")):
        from playhouse.db_url import connect
        return connect(url)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    # WAL lets readers (arbstr stats in another process) read while the proxy writes.
    return peewee.SqliteDatabase(path, pragmas={"journal_mode": "wal", "synchronous": "normal",
                                                "busy_timeout": 5000}, check_same_thread=False)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request, as the addon reports it to the ledger."""

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


@dataclass(frozen=True, slots=True)
class RatioUpdate:
    policy: str
    avg_ratio: float
    sample_count: int


RECORD_FIELDS = tuple(RequestRecord.__dataclass_fields__)

_STOP = object()
_WRITES = (RequestRecord, RatioUpdate)
"""What the writer writes; anything else on its queue is a read (function, future) or _STOP."""


class Ledger:
    """The database behind arbstr, used from any thread; all access happens on its own thread."""

    BATCH = 500

    def __init__(self, url: str, flush_interval: float = 0.05) -> None:
        self.url = url
        self.flush_interval = flush_interval
        """Seconds the writer lets rows gather after the first one before it writes them all at once."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        """Set when the writer must not wait out the flush interval: a read, or close()."""
        self._ready: Future[None] = Future()
        self._closed = False
        self.rows_lost = 0
        """Request rows the database refused: each is logged; the count is a metric that should stay 0."""
        self._thread = threading.Thread(target=self._run, name="arbstr-ledger", daemon=True)
        self._thread.start()
        self._ready.result()

    def record(self, record: RequestRecord) -> None:
        """Accept a row for writing; never blocks on the database."""
        self._queue.put(record)

    def queue_depth(self) -> int:
        """Rows and reads accepted and not yet handled by the writer (approximate while it runs)."""
        return self._queue.qsize()

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

    def save_ratio(self, policy: str, ratio: float, count: int) -> None:
        """Persist a policy's learned ratio with the next batch of rows; never waits."""
        self._queue.put(RatioUpdate(policy, ratio, count))

    def close(self) -> None:
        """Write every accepted row, then stop the thread and close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self.db = open_database(self.url)
            self.db.bind(MODELS)
            self.db.connect(reuse_if_open=True)
            migrate_database(self.db)
        except Exception as exc:
            self._ready.set_exception(exc)
            return
        fields = [RequestRow._meta.fields[name] for name in RECORD_FIELDS]
        self._insert_sql = RequestRow.insert({f: None for f in fields}).sql()[0]
        self._read_record = operator.attrgetter(*RECORD_FIELDS)
        # Only money needs converting (Decimal sats to integer nanosats); the other fields already
        # hold what both drivers take (str, int, float, bool, None), and peewee's per-field
        # conversion of them was most of the writer's Python time, held under the GIL.
        self._sats_columns = [(i, f.db_value) for i, f in enumerate(fields) if isinstance(f, SatsField)]
        self._ready.set_result(None)
        while True:
            items = [self._queue.get()]
            if isinstance(items[0], _WRITES):
                # Let a batch gather: one wake-up and one transaction for many rows, not one each
                # (a wake-up per row cost the event loop GIL time). Reads and close() cut it short.
                self._wake.wait(self.flush_interval)
            self._wake.clear()
            items += self._drain()
            if not self._process(items):
                break
        self.db.close()

    def _process(self, items: list[Any]) -> bool:
        """Write the rows and serve the reads, in the order they came; False once told to stop."""
        rows: list[RequestRecord | RatioUpdate] = []
        for index, item in enumerate(items):
            if isinstance(item, _WRITES):
                rows.append(item)
                if len(rows) >= self.BATCH:
                    self._write(rows)
                    rows = []
                continue
            self._write(rows)
            rows = []
            if item is _STOP:
                rest = items[index + 1:] + self._drain()
                self._write([r for r in rest if isinstance(r, _WRITES)])
                for late in rest:
                    if isinstance(late, tuple):
                        late[1].set_exception(RuntimeError("the ledger is closed"))
                return False
            self._serve(*item)
        self._write(rows)
        return True

    def _row_values(self, record: RequestRecord) -> list[Any]:
        values = list(self._read_record(record))
        for index, to_nanosats in self._sats_columns:
            values[index] = to_nanosats(values[index])
        return values

    def _drain(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _write(self, items: list[RequestRecord | RatioUpdate]) -> None:
        """One transaction: the rows, and the latest ratio of each policy among the updates."""
        rows = [self._row_values(i) for i in items if isinstance(i, RequestRecord)]
        ratios = {i.policy: i for i in items if isinstance(i, RatioUpdate)}
        if not items:
            return
        try:
            with self.db.atomic():
                if rows:
                    # One prepared statement for the batch: building a peewee query per row cost
                    # the proxy's event loop GIL time it needs.
                    self.db.cursor().executemany(self._insert_sql, rows)
                for update in ratios.values():
                    (TokenRatio.insert(**asdict(update))
                     .on_conflict(conflict_target=[TokenRatio.policy],
                                  preserve=[TokenRatio.avg_ratio, TokenRatio.sample_count])
                     .execute())
        except peewee.PeeweeException:
            self.rows_lost += len(rows)
            log.exception("could not write %d request rows", len(rows))

    @staticmethod
    def _serve(function: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(function())
        except BaseException as exc:  # the caller gets the error, the thread goes on
            future.set_exception(exc)
