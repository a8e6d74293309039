"""The ledger on real SQLite files: units read back by plain SQL, the writer loses nothing,
learning happens in the database, and a failing disk or a removed directory loses no row."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import threading
import time
from dataclasses import replace
from decimal import Decimal

import peewee
import pytest

from arbstr.estimator import ANY_MODEL, learned_rows, update_ratio
from arbstr.store import Learned, Ledger, RequestRecord, RequestRow, _learn_sql, redact_url

ROW = RequestRecord(
    request_id="r1", timestamp=1_790_000_000.0, policy="default", model="gpt-4o", provider="alpha",
    input_tokens=12, output_tokens=5, cost_sats=Decimal("0.052"), estimated_cost_sats=Decimal("0.05251"),
    next_best_cost_sats=Decimal("0.1"), max_cost_sats=Decimal("0.3"), cost_reported=True, latency_ms=12.5,
    ttft_ms=None, streaming=False, success=True, status_code=200, error=None, usage_estimated=False,
    attempts="none")


def rows(ledger: Ledger) -> list[RequestRow]:
    return ledger.call(lambda: list(RequestRow.select().order_by(RequestRow.id)))


def count(path, where: str = "1=1") -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM requests WHERE {where}").fetchone()[0]


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.02)


class TestLedger:
    def test_row_round_trips_with_exact_money(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"), instance_id="box:8080")
        ledger.record(ROW)
        [row] = rows(ledger)
        ledger.close()
        assert (row.cost_nsats, row.estimated_cost_nsats, row.next_best_cost_nsats, row.max_cost_nsats) == (
            52_000_000, 52_510_000, 100_000_000, 300_000_000)
        assert (row.provider, row.input_tokens, row.success, row.cost_reported) == ("alpha", 12, True, True)
        assert row.instance_id == "box:8080"

    def test_money_columns_say_their_unit_in_plain_sql(self, tmp_path):
        path = tmp_path / "a.db"
        ledger = Ledger(str(path))
        for index, cost in enumerate(("0.5", "0.22", "0.000000003")):
            ledger.record(replace(ROW, request_id=f"r{index}", cost_sats=Decimal(cost)))
        ledger.close()
        with sqlite3.connect(path) as db:
            columns = [c[1] for c in db.execute("PRAGMA table_info(requests)")]
            total = db.execute("SELECT SUM(cost_nsats), typeof(SUM(cost_nsats)) FROM requests").fetchone()
        assert total == (720_000_003, "integer")  # 0.720000003 sats
        assert {"cost_nsats", "estimated_cost_nsats", "next_best_cost_nsats", "max_cost_nsats"} <= set(columns)
        assert not [c for c in columns if c.endswith("_sats")]

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
        assert count(tmp_path / "a.db", "request_id != ''") == 2000

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
        assert count(tmp_path / "a.db") == ledger.BATCH + 23

    @pytest.mark.parametrize("size", [1, 3, 70, 1024, 1500])
    def test_a_batch_of_any_size_lands_whole_in_order_with_every_value(self, tmp_path, monkeypatch, size):
        # Rows go in by multi-row statements of power-of-two sizes: every row of a batch, each
        # value in its own column, none twice and none left over, whatever the batch's size.
        monkeypatch.setattr(Ledger, "BATCH", 2000)
        ledger = Ledger(str(tmp_path / "a.db"), flush_interval=60)
        sent = [replace(ROW, request_id=f"r{i}", input_tokens=i, cost_sats=Decimal(i) / 1000,
                        error=None if i % 2 else f"e{i}", ttft_ms=i / 4)
                for i in range(size)]
        for record in sent:
            ledger.record(record)
        ledger.close()
        with sqlite3.connect(tmp_path / "a.db") as db:
            got = db.execute("SELECT request_id, input_tokens, cost_nsats, error, ttft_ms, model FROM requests "
                             "ORDER BY id").fetchall()
        assert got == [(r.request_id, r.input_tokens, int(r.cost_sats * 10**9), r.error, r.ttft_ms, r.model)
                       for r in sent]

    def test_flush_interval_zero_commits_each_row_without_waiting(self, tmp_path):
        path = tmp_path / "a.db"
        ledger = Ledger(str(path), flush_interval=0)
        ledger.record(ROW)
        # Another connection sees the row without any read or close() having woken the writer.
        wait_until(lambda: count(path) == 1)
        ledger.close()

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
        assert ledger.health().to_dict() == {"state": "ok", "backlog": 0, "rows_lost": 0}
        ledger.close()

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


RATIOS = [0.5, 1.5, 0.8, 40.0, 0.01, 1.2, 0.9, 2.0, 1.1, 0.7]
"""Output/input ratios with a runaway reply (40) and a near-empty one (0.01), clamped from the fourth on."""


def python_ratio(samples: list[float]) -> tuple[float, int]:
    current = None
    for sample in samples:
        current = update_ratio(current, 1000, round(sample * 1000))
    return current.mean, current.count


class TestLearning:
    def test_the_database_learns_as_the_router_does_per_model_and_pooled(self, tmp_path):
        ledger = Ledger(str(tmp_path / "a.db"))
        for index, ratio in enumerate(RATIOS):
            ledger.learn("code", "m1" if index % 2 else "m2", ratio)
        ledger.learn("code[json]", "m1", 0.5)  # a shape within the policy: no row pooled over models
        learned = ledger.load_learning()
        ledger.close()
        pooled = learned[("code", ANY_MODEL)]
        mean, samples = python_ratio(RATIOS)
        assert pooled.count == samples == 10 and pooled.mean == pytest.approx(mean, rel=1e-12)
        m1 = learned[("code", "m1")]
        assert m1.count == 5 and m1.mean == pytest.approx(python_ratio(RATIOS[1::2])[0], rel=1e-12)
        assert set(learned) == {("code", ANY_MODEL), ("code", "m1"), ("code", "m2"), ("code[json]", "m1")}

    def test_variance_is_the_population_variance_of_what_counted(self):
        ledger = Ledger(":memory:")
        samples = [0.5, 0.7, 0.6, 0.9, 0.4]  # none clamped: within 4x of the mean
        for sample in samples:
            ledger.learn("default", "m", sample)
        learned = ledger.load_learning()[("default", "m")]
        ledger.close()
        assert learned.variance == pytest.approx(statistics.pvariance(samples), rel=1e-9)
        assert learned.mean == pytest.approx(statistics.mean(samples), rel=1e-12)

    def test_a_batch_of_samples_leaves_the_rows_one_upsert_per_sample_would(self, tmp_path):
        # Clamped samples (far from the mean), zeros, rows past the window: bit for bit the same.
        rng = random.Random(5)
        samples = [(rng.choice(["code", "chat", "code[json]"]), rng.choice(["m1", "m2"]),
                    rng.choice([rng.random() * 3, 0.0, 50.0, 1e-3]), 1000.0 + i) for i in range(400)]
        batched = Ledger(str(tmp_path / "batched.db"), flush_interval=60)  # one batch, cut by the read
        for policy, model, ratio, _ in samples:
            batched.learn(policy, model, ratio)
        learned = batched.load_learning()
        batched.close()
        Ledger(str(tmp_path / "one.db")).close()  # the schema
        with sqlite3.connect(tmp_path / "one.db") as db:
            for policy, model, ratio, at in samples:
                for row_policy, row_model in learned_rows(policy, model):
                    db.execute(_learn_sql("?"), (row_policy, row_model, ratio, at))
            one_by_one = {(policy, model): Learned(mean, variance, count) for policy, model, count, mean, variance
                          in db.execute("SELECT policy, model, sample_count, mean, variance FROM output_ratios")}
        assert learned == one_by_one and len(learned) == 8  # a shape's rows have no pooled one

    def test_learned_ratios_are_loaded_at_start_and_reloaded(self, tmp_path):
        path = str(tmp_path / "a.db")
        first = Ledger(path, reload_interval=0.05)
        other = Ledger(path)
        other.learn("code", "m", 2.0)
        other.close()
        version = first.learned_version
        wait_until(lambda: first.learned_version > version and ("code", ANY_MODEL) in first.learned)
        assert first.learned[("code", ANY_MODEL)] == Learned(2.0, 0.0, 1)
        first.close()
        assert Ledger(path).learned[("code", "m")].count == 1


class FullDisk:
    """A directory on a small filesystem that a test can fill up and free again: a tmpfs of its own
    when this process may mount one, else the ledger's writes fail by injection as a full disk does."""

    def __init__(self, root, mocker) -> None:
        self.dir = root / "small"
        self.dir.mkdir()
        self.mocker = mocker
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(self.dir)],
                                      capture_output=True).returncode == 0
        self.full = False

    def attach(self, ledger: Ledger) -> None:
        if self.mounted:
            return
        real = ledger._write

        def write(*args, **kwargs):
            if self.full:
                raise peewee.OperationalError("database or disk is full")
            return real(*args, **kwargs)

        self.mocker.patch.object(ledger, "_write", side_effect=write)

    def fill(self) -> None:
        self.full = True
        if not self.mounted:
            return
        filler = os.open(self.dir / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, b"\0" * 4096)
        except OSError:  # no space left: what the test wants
            pass
        finally:
            os.close(filler)

    def free(self) -> None:
        self.full = False
        (self.dir / "filler").unlink(missing_ok=True)

    def remove(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=True)


@pytest.fixture
def full_disk(tmp_path, mocker):
    disk = FullDisk(tmp_path, mocker)
    yield disk
    disk.remove()


class TestNoSilentLoss:
    def test_disk_full_keeps_the_rows_and_writes_them_when_space_returns(self, full_disk, caplog):
        path = full_disk.dir / "a.db"
        ledger = Ledger(str(path), flush_interval=0)
        full_disk.attach(ledger)
        ledger.record(replace(ROW, request_id="before"))
        wait_until(lambda: count(path) == 1)
        full_disk.fill()
        with caplog.at_level(logging.WARNING, logger="arbstr.store"):
            for i in range(350):
                ledger.record(replace(ROW, request_id=f"full-{i}", error="x" * 200))
            wait_until(lambda: ledger.health().backlog == 350)
            assert ledger.health().to_dict() == {"state": "failing", "backlog": 350, "rows_lost": 0}
            time.sleep(0.6)  # a few retries fail meanwhile: the log says so once, not per retry
            full_disk.free()
            wait_until(lambda: ledger.health().state == "ok")
        assert ledger.health().to_dict() == {"state": "ok", "backlog": 0, "rows_lost": 0}
        ledger.close()
        assert count(path) == 351
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "cannot write" in m]) == 1
        assert len([m for m in messages if "writes again" in m]) == 1

    def test_a_removed_directory_keeps_new_rows_until_it_is_back(self, tmp_path):
        folder = tmp_path / "ledger"
        folder.mkdir()
        path = folder / "a.db"
        ledger = Ledger(str(path), flush_interval=0)
        ledger.record(replace(ROW, request_id="gone-with-the-directory"))
        wait_until(lambda: count(path) == 1)
        shutil.rmtree(folder)
        for i in range(300):
            ledger.record(replace(ROW, request_id=f"after-{i}"))
        wait_until(lambda: ledger.health().backlog == 300)
        assert ledger.health().state == "failing"
        folder.mkdir()
        wait_until(lambda: ledger.health().state == "ok")
        ledger.close()
        assert count(path, "request_id LIKE 'after-%'") == 300 == count(path)

    def test_a_removed_file_shows_as_failing_before_any_row_is_at_stake(self, tmp_path):
        folder = tmp_path / "ledger"
        folder.mkdir()
        ledger = Ledger(str(folder / "a.db"), reload_interval=0.05)
        shutil.rmtree(folder)
        wait_until(lambda: ledger.health().state == "failing")
        folder.mkdir()
        wait_until(lambda: ledger.health().state == "ok")
        ledger.record(ROW)
        ledger.close()
        assert count(folder / "a.db") == 1

    def test_the_buffer_overflows_into_the_spill_file_then_back(self, tmp_path, full_disk):
        path = full_disk.dir / "a.db"
        spill = tmp_path / "spill.jsonl"
        ledger = Ledger(str(path), flush_interval=0, buffer_rows=10, spill_path=str(spill))
        full_disk.attach(ledger)
        full_disk.fill()
        for i in range(25):
            ledger.record(replace(ROW, request_id=f"r{i}"))
        wait_until(lambda: ledger.health().backlog == 25)
        assert ledger.health().to_dict() == {"state": "failing", "backlog": 25, "rows_lost": 0}
        assert len(spill.read_text().splitlines()) == 15
        full_disk.free()
        wait_until(lambda: ledger.health().to_dict() == {"state": "ok", "backlog": 0, "rows_lost": 0})
        ledger.close()
        assert not spill.exists()
        assert count(path) == 25 and count(path, "cost_nsats = 52000000") == 25

    def test_without_a_spill_file_rows_past_the_buffer_are_counted_as_lost(self, full_disk, caplog):
        path = full_disk.dir / "a.db"
        ledger = Ledger(str(path), flush_interval=0, buffer_rows=10)
        full_disk.attach(ledger)
        full_disk.fill()
        with caplog.at_level(logging.ERROR, logger="arbstr.store"):
            for i in range(25):
                ledger.record(replace(ROW, request_id=f"r{i}"))
            wait_until(lambda: ledger.health().rows_lost == 15)
        assert ledger.health().to_dict() == {"state": "failing", "backlog": 10, "rows_lost": 15}
        assert len([r for r in caplog.records if "losing rows" in r.getMessage()]) == 1
        full_disk.free()
        wait_until(lambda: ledger.health().state == "ok")
        ledger.close()
        assert count(path) == 10

    def test_rows_still_failing_at_close_wait_in_the_spill_file_for_the_next_start(self, tmp_path, full_disk):
        path = full_disk.dir / "a.db"
        spill = tmp_path / "spill.jsonl"
        ledger = Ledger(str(path), flush_interval=0, spill_path=str(spill))
        ledger.CLOSE_RETRY = 0.2
        full_disk.attach(ledger)
        full_disk.fill()
        for i in range(5):
            ledger.record(replace(ROW, request_id=f"r{i}"))
        wait_until(lambda: ledger.health().backlog == 5)
        ledger.close()
        assert len(spill.read_text().splitlines()) == 5
        full_disk.free()
        # A row of the spill file already in the table (a crash while replaying) is not written twice.
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO requests (request_id, timestamp, policy, model, attempts) "
                       "VALUES ('r0', 0, '', '', '')")
        again = Ledger(str(path), spill_path=str(spill))
        again.close()
        assert not spill.exists()
        assert count(path) == 5 and count(path, "request_id = 'r0'") == 1


@pytest.mark.parametrize("url,shown", [
    ("postgresql://arbstr:s3cret@db.example:5432/ledger", "postgresql://arbstr:***@db.example:5432/ledger"),
    ("postgresql://arbstr@db.example/ledger", "postgresql://arbstr@db.example/ledger"),
    ("sqlite:///var/arbstr.db", "sqlite:///var/arbstr.db"),
])
def test_database_urls_are_shown_without_passwords(url, shown):
    assert redact_url(url) == shown

