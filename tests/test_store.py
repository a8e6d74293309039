"""The ledger on real SQLite files: migrations keep old rows, the writer loses nothing."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from decimal import Decimal

import pytest

from arbstr.store import MIGRATIONS, Ledger, RequestRecord, RequestRow, TokenRatio, redact_url, schema_version

ROW = RequestRecord(
    request_id="r1", timestamp=1_790_000_000.0, policy="default", model="gpt-4o", provider="alpha",
    input_tokens=12, output_tokens=5, cost_sats=Decimal("0.052"), estimated_cost_sats=Decimal("0.05251"),
    next_best_cost_sats=Decimal("0.1"), max_cost_sats=Decimal("0.3"), cost_reported=True, latency_ms=12.5,
    ttft_ms=None, streaming=False, success=True, status_code=200, error=None, usage_estimated=False,
    attempts="none")


def rows(ledger: Ledger) -> list[RequestRow]:
    return ledger.call(lambda: list(RequestRow.select().order_by(RequestRow.id)))


class TestLedger:
    def test_row_round_trips_with_exact_money(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        ledger.record(ROW)
        [row] = rows(ledger)
        ledger.close()
        assert row.cost_sats == Decimal("0.052") and row.estimated_cost_sats == Decimal("0.05251")
        assert (row.provider, row.input_tokens, row.success, row.cost_reported) == ("alpha", 12, True, True)

    def test_money_is_stored_as_integer_nanosats(self, tmp_path):
        path = tmp_path / "a.db"
        ledger = Ledger(str(path))
        ledger.record(replace(ROW, cost_sats=Decimal("0.000000001") * 3))
        ledger.close()
        raw = sqlite3.connect(path).execute("SELECT cost_sats, typeof(cost_sats) FROM requests").fetchone()
        assert raw == (3, "integer")

    def test_close_writes_every_accepted_row_from_many_threads(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))

        def burst(n: int) -> None:
            for i in range(500):
                ledger.record(replace(ROW, request_id=f"{n}-{i}"))

        threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger.close()
        count = sqlite3.connect(tmp_path / "a.db").execute("SELECT COUNT(DISTINCT request_id) FROM requests").fetchone()
        assert count == (2000,)

    def test_rows_gather_into_batches_and_reads_or_close_cut_the_wait_short(self, tmp_path, mocker):
        # A flush interval far longer than the test may take: only a read or close() can end the wait.
        ledger = Ledger(str(tmp_path / "a.db"), flush_interval=60)
        writes = mocker.spy(ledger, "_write")
        for i in range(3):
            ledger.record(replace(ROW, request_id=f"early-{i}"))
        seen = ledger.submit(lambda: RequestRow.select().count()).result(timeout=10)
        assert seen == 3  # the rows queued before the read, written before it runs
        for i in range(ledger.BATCH + 20):
            ledger.record(replace(ROW, request_id=f"late-{i}"))
        closing = threading.Thread(target=ledger.close)
        closing.start()
        closing.join(timeout=10)
        assert not closing.is_alive()
        batches = [len(call.args[0]) for call in writes.call_args_list if call.args[0]]
        assert batches == [3, ledger.BATCH, 20]
        count = sqlite3.connect(tmp_path / "a.db").execute("SELECT COUNT(*) FROM requests").fetchone()
        assert count == (ledger.BATCH + 23,)

    def test_a_read_queued_after_close_gets_an_error_not_a_hang(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        ledger.close()
        with pytest.raises(RuntimeError, match="closed"):
            ledger.submit(lambda: 1)

    def test_wal_mode(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        mode = ledger.call(lambda: ledger.db.execute_sql("PRAGMA journal_mode").fetchone()[0])
        ledger.close()
        assert mode == "wal"

    def test_memory_database(self):
        ledger = Ledger(":memory:")
        ledger.record(ROW)
        assert len(rows(ledger)) == 1
        ledger.close()

    def test_ratios_are_upserted(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        ledger.save_ratio("code", 0.5, 1)
        ledger.save_ratio("code", 0.75, 2)
        saved = ledger.call(lambda: [(r.policy, r.avg_ratio, r.sample_count) for r in TokenRatio.select()])
        ledger.close()
        assert saved == [("code", 0.75, 2)]

    def test_errors_from_reads_reach_the_caller_and_the_thread_goes_on(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        with pytest.raises(ZeroDivisionError):
            ledger.call(lambda: 1 / 0)
        ledger.record(ROW)
        assert len(rows(ledger)) == 1
        ledger.close()

    def test_unusable_path_is_a_clear_error(self, tmp_path):
        with pytest.raises(Exception) as err:
            Ledger(str(tmp_path / "missing-dir" / "a.db"))
        assert "unable to open" in str(err.value)


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


class TestMigrations:
    def test_an_old_database_is_upgraded_with_its_rows(self, tmp_path):
        path = tmp_path / "old.db"
        with sqlite3.connect(path) as db:
            db.executescript(SEED_SCHEMA)
        ledger = Ledger(str(path))
        old = rows(ledger)
        ledger.record(replace(ROW, request_id="new", app="notes"))
        assert ledger.call(lambda: schema_version(ledger.db)) == len(MIGRATIONS)
        ratios = ledger.call(lambda: [(r.policy, r.avg_ratio, r.sample_count) for r in TokenRatio.select()])
        everything = rows(ledger)
        ledger.close()
        assert [(r.provider, r.cost_sats, r.error) for r in old] == [
            ("old", Decimal("0.052"), None), ("old", None, "upstream_error")]
        assert old[0].request_id == "" and old[0].streaming is False  # new columns, defaults
        assert ratios == [("code", 1.5, 7)]
        assert [r.request_id for r in everything] == ["", "", "new"]
        assert [r.app for r in everything] == [None, None, "notes"]

    def test_migrating_twice_changes_nothing(self, tmp_path):
        path = str(tmp_path / "a.db")
        Ledger(path).close()
        ledger = Ledger(path)
        ledger.record(ROW)
        versions = ledger.call(lambda: ledger.db.execute_sql("SELECT version FROM arbstr_schema").fetchall())
        ledger.close()
        assert versions == [(n,) for n in range(1, len(MIGRATIONS) + 1)]


@pytest.mark.parametrize("url,shown", [
    ("postgresql://arbstr:s3cret@db.example:5432/ledger", "postgresql://arbstr:***@db.example:5432/ledger"),
    ("postgresql://arbstr@db.example/ledger", "postgresql://arbstr@db.example/ledger"),
    ("sqlite:///var/arbstr.db", "sqlite:///var/arbstr.db"),
])
def test_database_urls_are_shown_without_passwords(url, shown):
    assert redact_url(url) == shown
