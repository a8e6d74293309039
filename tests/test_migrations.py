"""Every schema arbstr ever wrote is upgraded in place, its rows kept with what they meant.

The historical schemas are frozen here as the SQL each version left behind (dumped from the code
that made them), never derived from today's models.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import peewee
import pytest

from arbstr import migrations
from arbstr.estimator import ANY_MODEL
from arbstr.migrations import MIGRATIONS, migrate_database
from arbstr.store import Learned, Ledger, RequestRow, schema_applied

from test_store import ROW

SEED_SCHEMA = """
CREATE TABLE requests (id INTEGER PRIMARY KEY, timestamp REAL NOT NULL, policy VARCHAR(128), model VARCHAR(256),
    provider VARCHAR(128), input_tokens INTEGER, output_tokens INTEGER, cost_sats BIGINT, latency_ms REAL,
    success BOOLEAN, error TEXT);
CREATE TABLE token_ratios (id INTEGER PRIMARY KEY, policy VARCHAR(128) NOT NULL UNIQUE, avg_ratio REAL NOT NULL,
    sample_count INTEGER NOT NULL);
INSERT INTO requests (timestamp, policy, model, provider, input_tokens, output_tokens, cost_sats, latency_ms, success, error)
    VALUES (1700000000.0, 'default', 'gpt-4o', 'old', 10, 20, 52000000, 99.0, 1, NULL),
           (1700000001.0, 'code', 'gpt-4o', 'old', 1, 0, NULL, 5.0, 0, 'upstream_error');
INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES ('code', 1.5, 7);
"""
"""Before schema versions: the seeds' tables (money already in nanosats under the name cost_sats)."""

SCHEMA_1 = SEED_SCHEMA + """
CREATE TABLE IF NOT EXISTS "arbstr_schema" ("id" INTEGER NOT NULL PRIMARY KEY, "version" INTEGER NOT NULL);
INSERT INTO arbstr_schema (version) VALUES (1);
"""

SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS "arbstr_schema" ("id" INTEGER NOT NULL PRIMARY KEY, "version" INTEGER NOT NULL);
CREATE TABLE token_ratios (id INTEGER PRIMARY KEY, policy VARCHAR(128) NOT NULL UNIQUE, avg_ratio REAL NOT NULL, sample_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS "requests" (id INTEGER PRIMARY KEY, timestamp REAL NOT NULL, policy VARCHAR(128), model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, output_tokens INTEGER, cost_sats BIGINT, latency_ms REAL, success BOOLEAN, error TEXT, "request_id" VARCHAR(64) NOT NULL, "estimated_cost_sats" INTEGER, "next_best_cost_sats" INTEGER, "max_cost_sats" INTEGER, "cost_reported" INTEGER NOT NULL, "ttft_ms" REAL, "streaming" INTEGER NOT NULL, "status_code" INTEGER, "usage_estimated" INTEGER NOT NULL, "attempts" TEXT NOT NULL);
CREATE INDEX requests_timestamp ON requests (timestamp);
CREATE INDEX requests_request_id ON requests (request_id);
INSERT INTO arbstr_schema (version) VALUES (1), (2);
INSERT INTO requests (timestamp, policy, model, provider, input_tokens, output_tokens, cost_sats, latency_ms, success,
    error, request_id, estimated_cost_sats, next_best_cost_sats, max_cost_sats, cost_reported, ttft_ms, streaming,
    status_code, usage_estimated, attempts)
    VALUES (1700000000.0, 'default', 'gpt-4o', 'old', 10, 20, 52000000, 99.0, 1, NULL, 'r-old', 52510000, 100000000,
            300000000, 1, 12.5, 1, 200, 0, 'none'),
           (1700000001.0, 'code', 'gpt-4o', NULL, 1, NULL, NULL, 5.0, 0, 'upstream_error', 'r-failed', NULL, NULL,
            NULL, 0, NULL, 0, 502, 1, 'old:refused');
INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES ('code', 1.5, 7);
"""
"""What main's schema 2 left on SQLite (its migration rebuilt the table without column defaults)."""

SCHEMA_3 = SCHEMA_2 + """
ALTER TABLE requests ADD COLUMN app VARCHAR(128);
CREATE INDEX IF NOT EXISTS requests_app ON requests (app);
INSERT INTO arbstr_schema (version) VALUES (3);
UPDATE requests SET app = 'notes' WHERE request_id = 'r-old';
"""
"""Main's schema 3: the app each request is attributed to."""


def build(path, script: str) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(script)


def upgraded_rows(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT request_id, provider, cost_nsats, estimated_cost_nsats, next_best_cost_nsats, "
                          "max_cost_nsats, streaming, error, instance_id FROM requests ORDER BY id").fetchall()


def columns(path, table: str) -> dict[str, tuple]:
    with sqlite3.connect(path) as db:
        return {c[1]: (c[2].upper().replace("DOUBLE PRECISION", "REAL"), c[3]) for c in
                db.execute(f"PRAGMA table_info({table})")}


@pytest.mark.parametrize("script", [SEED_SCHEMA, SCHEMA_1], ids=["seeds", "schema-1"])
def test_a_database_before_schema_2_is_upgraded_with_its_rows(tmp_path, script):
    path = tmp_path / "old.db"
    build(path, script)
    ledger = Ledger(str(path))
    ledger.record(replace(ROW, request_id="new"))
    applied = ledger.call(lambda: schema_applied(ledger.db))
    learned = ledger.learned
    ledger.close()
    assert applied == [m.__name__ for m in MIGRATIONS]
    assert upgraded_rows(path) == [
        ("", "old", 52_000_000, None, None, None, 0, None, ""),
        ("", "old", None, None, None, None, 0, "upstream_error", ""),
        ("new", "alpha", 52_000_000, 52_510_000, 100_000_000, 300_000_000, 0, None, "")]
    assert learned == {("code", ANY_MODEL): Learned(1.5, 0.0, 7)}


@pytest.mark.parametrize("script,app", [(SCHEMA_2, None), (SCHEMA_3, "notes")], ids=["schema-2", "schema-3"])
def test_a_numbered_schema_as_main_left_it_is_upgraded_with_its_rows(tmp_path, script, app):
    path = tmp_path / "old.db"
    build(path, script)
    ledger = Ledger(str(path), instance_id="box:1")
    ledger.record(replace(ROW, request_id="new", app="cli"))
    stats_rows = ledger.call(lambda: [(r.request_id, r.cost_reported, r.usage_estimated, r.attempts, r.app)
                                      for r in RequestRow.select().order_by(RequestRow.id)])
    ledger.close()
    assert upgraded_rows(path) == [
        ("r-old", "old", 52_000_000, 52_510_000, 100_000_000, 300_000_000, 1, None, ""),
        ("r-failed", None, None, None, None, None, 0, "upstream_error", ""),
        ("new", "alpha", 52_000_000, 52_510_000, 100_000_000, 300_000_000, 0, None, "box:1")]
    assert stats_rows == [("r-old", True, False, "none", app), ("r-failed", False, True, "old:refused", None),
                          ("new", True, False, "none", "cli")]
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"requests", "output_ratios", "arbstr_migrations", "budget_totals", "budget_reservations",
                      "budget_alert_levels", "budget_owners"}


def test_an_upgraded_database_has_the_columns_of_a_new_one(tmp_path):
    build(tmp_path / "old.db", SCHEMA_3)
    for name in ("old.db", "new.db"):
        Ledger(str(tmp_path / name)).close()
    old, new = columns(tmp_path / "old.db", "requests"), columns(tmp_path / "new.db", "requests")
    # main's schema-2 migration wrote BOOLEAN as INTEGER and BIGINT as INTEGER: the same storage in SQLite.
    assert set(old) == set(new)
    assert {name: null for name, (_, null) in old.items()} == {name: null for name, (_, null) in new.items()}


def test_migrating_twice_changes_nothing(tmp_path):
    path = str(tmp_path / "a.db")
    Ledger(path).close()
    ledger = Ledger(path)
    ledger.record(ROW)
    applied = ledger.call(lambda: migrate_database(ledger.db))
    names = ledger.call(lambda: schema_applied(ledger.db))
    ledger.close()
    assert applied == [] and names == [m.__name__ for m in MIGRATIONS]


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    build(path, SCHEMA_3)

    def broken(s):
        s.run("ALTER TABLE requests ADD COLUMN half_done INTEGER")
        raise RuntimeError("boom")

    broken.__name__ = "m999_broken"
    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="boom"):
        migrate_database(peewee.SqliteDatabase(str(path)))
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = db.execute("SELECT version FROM arbstr_schema").fetchall()
    assert "arbstr_migrations" not in tables and versions == [(1,), (2,), (3,)]
    assert "half_done" not in columns(path, "requests") and "cost_sats" in columns(path, "requests")


def test_migrations_never_read_the_models():
    # Each one spells out its change in SQL: a later edit of a model must not change an old migration.
    assert not [v for v in vars(migrations).values() if isinstance(v, type) and issubclass(v, peewee.Model)]
    names = [m.__name__ for m in MIGRATIONS]
    assert len(set(names)) == len(names) and names == sorted(names)
