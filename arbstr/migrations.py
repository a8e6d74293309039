"""The ledger's schema, as a list of named migrations that each spell out their own change.

As in simonw/llm's `migrations.py`: a migration is written once, in SQL, and never edited; it
never reads today's peewee models (a later edit of a model must not change what an old
migration does). The database records each migration applied by name in `arbstr_migrations`.
SQLite and PostgreSQL differ in a few type names only, so each migration gets a `Schema` that
names them and runs its statements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import peewee

log = logging.getLogger("arbstr.store")

Migration = Callable[["Schema"], None]
MIGRATIONS: list[Migration] = []
"""In the order they run. Append, never edit or reorder."""

LEGACY_VERSIONS = ("m001_initial", "m002_request_detail", "m003_app")
"""What schema version N of the numbered `arbstr_schema` table (before names) had applied."""


def migration(function: Migration) -> Migration:
    MIGRATIONS.append(function)
    return function


@dataclass(frozen=True)
class Schema:
    """The database a migration changes, with the few type names SQLite and PostgreSQL spell differently."""

    db: peewee.Database

    @property
    def postgres(self) -> bool:
        return not isinstance(self.db, peewee.SqliteDatabase)

    @property
    def serial(self) -> str:
        return "SERIAL" if self.postgres else "INTEGER"

    @property
    def double(self) -> str:
        return "DOUBLE PRECISION" if self.postgres else "REAL"

    @property
    def false(self) -> str:
        return "false" if self.postgres else "0"

    def run(self, *statements: str) -> None:
        for statement in statements:
            self.db.execute_sql(statement)

    def tables(self) -> set[str]:
        return set(self.db.get_tables())


@migration
def m001_initial(s: Schema) -> None:
    """Requests and learned ratios, as the seeds had them (money as integer nanosats, in `cost_sats`)."""
    s.run(f"CREATE TABLE IF NOT EXISTS requests (id {s.serial} PRIMARY KEY, timestamp {s.double} NOT NULL, "
          "policy VARCHAR(128), model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, "
          f"output_tokens INTEGER, cost_sats BIGINT, latency_ms {s.double}, success BOOLEAN, error TEXT)",
          f"CREATE TABLE IF NOT EXISTS token_ratios (id {s.serial} PRIMARY KEY, policy VARCHAR(128) NOT NULL UNIQUE, "
          f"avg_ratio {s.double} NOT NULL, sample_count INTEGER NOT NULL)")


@migration
def m002_request_detail(s: Schema) -> None:
    """Estimates, savings, streaming facts and error detail on every request."""
    s.run(*(f"ALTER TABLE requests ADD COLUMN {column}" for column in (
        "request_id VARCHAR(64) NOT NULL DEFAULT ''",
        "estimated_cost_sats BIGINT",
        "next_best_cost_sats BIGINT",
        "max_cost_sats BIGINT",
        f"cost_reported BOOLEAN NOT NULL DEFAULT {s.false}",
        f"ttft_ms {s.double}",
        f"streaming BOOLEAN NOT NULL DEFAULT {s.false}",
        "status_code INTEGER",
        f"usage_estimated BOOLEAN NOT NULL DEFAULT {s.false}",
        "attempts TEXT NOT NULL DEFAULT ''")))
    s.run("CREATE INDEX IF NOT EXISTS requests_timestamp ON requests (timestamp)",
          "CREATE INDEX IF NOT EXISTS requests_request_id ON requests (request_id)")


@migration
def m003_app(s: Schema) -> None:
    """The app each request is attributed to, for spend per app."""
    s.run("ALTER TABLE requests ADD COLUMN app VARCHAR(128)",
          "CREATE INDEX IF NOT EXISTS requests_app ON requests (app)")


@migration
def m004_money_columns_named_nsats(s: Schema) -> None:
    """The money columns always held integer nanosats: their names now say so (values unchanged)."""
    s.run(*(f"ALTER TABLE requests RENAME COLUMN {name}_sats TO {name}_nsats"
            for name in ("cost", "estimated_cost", "next_best_cost", "max_cost")))


@migration
def m005_instance_id(s: Schema) -> None:
    """Which arbstr instance wrote each row, for several instances sharing one database."""
    s.run("ALTER TABLE requests ADD COLUMN instance_id VARCHAR(255) NOT NULL DEFAULT ''",
          "CREATE INDEX IF NOT EXISTS requests_instance_id ON requests (instance_id)")


@migration
def m006_output_ratios(s: Schema) -> None:
    """Learned output/input ratios per (policy, model) with a variance, updated in the database itself.
    A policy's old ratio becomes its row for every model pooled (model '*'); its spread was never kept."""
    s.run(f"CREATE TABLE output_ratios (policy VARCHAR(128) NOT NULL, model VARCHAR(256) NOT NULL, "
          f"sample_count INTEGER NOT NULL, mean {s.double} NOT NULL, variance {s.double} NOT NULL, "
          f"updated_at {s.double} NOT NULL, PRIMARY KEY (policy, model))",
          "INSERT INTO output_ratios (policy, model, sample_count, mean, variance, updated_at) "
          "SELECT policy, '*', sample_count, avg_ratio, 0, 0 FROM token_ratios",
          "DROP TABLE token_ratios")


@migration
def m007_charge_difference(s: Schema) -> None:
    """Each request's reported charge minus what the advertised prices allow for its tokens, in
    msats (null when the provider reported no charge or no usage): above 1 is an overcharge."""
    s.run("ALTER TABLE requests ADD COLUMN charge_diff_msats BIGINT")


@migration
def m008_budgets(s: Schema) -> None:
    """Budgets, next to the ledger so several instances share them: running totals of spent and
    reserved nanosats per budget and time bucket, the open reservations (what each holds where),
    and the alert level each budget has reached."""
    s.run(f"CREATE TABLE budget_totals (id {s.serial} PRIMARY KEY, budget VARCHAR(128) NOT NULL, "
          f"bucket {s.double} NOT NULL, spent_nsats BIGINT NOT NULL, reserved_nsats BIGINT NOT NULL, "
          "UNIQUE (budget, bucket))",
          f"CREATE TABLE budget_reservations (id {s.serial} PRIMARY KEY, reservation VARCHAR(64) NOT NULL, "
          f"budget VARCHAR(128) NOT NULL, bucket {s.double} NOT NULL, amount_nsats BIGINT NOT NULL)",
          "CREATE INDEX budget_reservations_reservation ON budget_reservations (reservation)",
          f"CREATE TABLE budget_alert_levels (id {s.serial} PRIMARY KEY, budget VARCHAR(128) NOT NULL UNIQUE, "
          f"level INTEGER NOT NULL, period {s.double} NOT NULL)")


@migration
def m009_budget_owners(s: Schema) -> None:
    """Who holds each budget reservation (one arbstr process), and when each owner was last seen
    alive, so what a process killed mid-request left reserved is reclaimed instead of held until
    its window passes; with what the request was expected to cost, the figure a reclaimed
    reservation counts as spent. Reservations from before have no owner: reclaimed at the next
    start, at their full worst case (all they said)."""
    s.run("ALTER TABLE budget_reservations ADD COLUMN owner VARCHAR(300) NOT NULL DEFAULT ''",
          "ALTER TABLE budget_reservations ADD COLUMN expected_nsats BIGINT NOT NULL DEFAULT 0",
          "UPDATE budget_reservations SET expected_nsats = amount_nsats",
          "CREATE INDEX budget_reservations_owner ON budget_reservations (owner)",
          f"CREATE TABLE budget_owners (owner VARCHAR(300) PRIMARY KEY, host VARCHAR(255) NOT NULL, "
          f"pid INTEGER NOT NULL, heartbeat_at {s.double} NOT NULL)")


def applied_migrations(s: Schema) -> set[str]:
    """Names already applied; creates the record table, carrying over what older records said."""
    tables = s.tables()
    if "arbstr_migrations" in tables:
        return {row[0] for row in s.db.execute_sql("SELECT name FROM arbstr_migrations").fetchall()}
    s.run(f"CREATE TABLE arbstr_migrations (name VARCHAR(255) PRIMARY KEY, applied_at {s.double} NOT NULL)")
    if "arbstr_schema" in tables:
        # Schema versions were numbered before they were named.
        version = s.db.execute_sql("SELECT MAX(version) FROM arbstr_schema").fetchone()[0] or 0
        done = set(LEGACY_VERSIONS[:version])
        s.run("DROP TABLE arbstr_schema")
    else:
        # A database from before any record, with the seeds' tables, is at the first migration.
        done = {"m001_initial"} if "requests" in tables else set()
    for name in sorted(done):
        _record(s, name)
    return done


def _record(s: Schema, name: str) -> None:
    s.db.execute_sql("INSERT INTO arbstr_migrations (name, applied_at) VALUES (%s, %s)"
                     % (s.db.param, s.db.param), (name, time.time()))


def migrate_database(db: peewee.Database) -> list[str]:
    """Bring the schema up to date in place, keeping every row; returns the names applied now.

    One transaction, so a failed migration leaves the database as it was. On PostgreSQL an
    advisory lock makes instances starting together migrate one after the other; on SQLite the
    write lock taken at BEGIN IMMEDIATE does the same.
    """
    s = Schema(db)
    with db.atomic() if s.postgres else db.atomic("IMMEDIATE"):
        if s.postgres:
            db.execute_sql("SELECT pg_advisory_xact_lock(72177)")  # any constant, the same for every instance
        done = applied_migrations(s)
        applied = []
        for step in MIGRATIONS:
            if step.__name__ not in done:
                step(s)
                _record(s, step.__name__)
                applied.append(step.__name__)
                log.info("database migrated: %s", step.__name__)
        return applied
