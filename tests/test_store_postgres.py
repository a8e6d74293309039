"""The same ledger code on PostgreSQL (what teams running several instances share): a real
server from the machine's PostgreSQL packages, started in a temp dir on a free port."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from decimal import Decimal

import psycopg2
import pytest

from arbstr.estimator import ANY_MODEL
from arbstr.migrations import MIGRATIONS
from arbstr.stats import compute_stats, parse_window
from arbstr.store import Ledger, schema_applied

import test_budgets
from test_budgets import race_instances
from test_stats import FIXTURE, NOW
from test_store import ROW, wait_until


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    assert initdb, "PostgreSQL is not installed: `make test` installs it (apt package postgresql)"
    return os.path.dirname(initdb)


class Server:
    """A PostgreSQL server of its own; as root it runs as the postgres user, as PostgreSQL requires."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = tempfile.mkdtemp(prefix="arbstr-pg-")
        self.as_user = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = {"user": account.pw_uid, "group": account.pw_gid}
        self.data = os.path.join(self.root, "data")
        subprocess.run([f"{self.bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, **self.as_user)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off")
        subprocess.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-o", options, "-l",
                        os.path.join(self.root, "log"), "-w", "start"], check=True, capture_output=True, **self.as_user)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"],
                       capture_output=True, **self.as_user)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def database_url(server):
    """A fresh database for each test."""
    name = "arbstr_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(f"postgresql://postgres@{server.address}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    admin.close()
    return f"postgresql://postgres@{server.address}/{name}"


def query(url: str, sql: str) -> list[tuple]:
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def run_sql(url: str, sql: str) -> None:
    connection = psycopg2.connect(url)
    connection.autocommit = True
    connection.cursor().execute(sql)
    connection.close()


def test_rows_round_trip_exactly_and_plain_sql_reads_nanosats(database_url):
    ledger = Ledger(database_url, instance_id="pg:1")
    ledger.record(ROW)
    ledger.record(replace(ROW, request_id="r2", cost_sats=Decimal("0.000000001")))
    ledger.record(replace(ROW, request_id="r3", cost_sats=Decimal("0.668")))
    ledger.close()
    assert query(database_url, "SELECT request_id, cost_nsats, instance_id FROM requests ORDER BY id") == [
        ("r1", 52_000_000, "pg:1"), ("r2", 1, "pg:1"), ("r3", 668_000_000, "pg:1")]
    assert query(database_url, "SELECT SUM(cost_nsats) FROM requests") == [(720_000_001,)]


def test_stats_agree_with_sqlite(database_url, tmp_path):
    results = []
    for url in (database_url, str(tmp_path / "same.db")):
        ledger = Ledger(url)
        for record in FIXTURE:
            ledger.record(record)
        window = parse_window({}, NOW)
        results.append(ledger.call(lambda: compute_stats(window, "provider")))
        ledger.close()
    assert results[0] == results[1]
    assert results[0]["totals"]["cost_sats"] == "1.552001"


SEED = (
    "CREATE TABLE requests (id SERIAL PRIMARY KEY, timestamp DOUBLE PRECISION NOT NULL, policy VARCHAR(128), "
    "model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, output_tokens INTEGER, cost_sats BIGINT, "
    "latency_ms DOUBLE PRECISION, success BOOLEAN, error TEXT);"
    "CREATE TABLE token_ratios (id SERIAL PRIMARY KEY, policy VARCHAR(128) NOT NULL UNIQUE, "
    "avg_ratio DOUBLE PRECISION NOT NULL, sample_count INTEGER NOT NULL);"
    "INSERT INTO requests (timestamp, policy, model, provider, input_tokens, output_tokens, cost_sats, latency_ms,"
    " success, error) VALUES (1700000000.0, 'default', 'gpt-4o', 'old', 10, 20, 52000000, 99.0, true, NULL);"
    "INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES ('code', 1.5, 7);")
"""The seeds' tables on PostgreSQL."""

SCHEMA_2 = (
    "CREATE TABLE arbstr_schema (id SERIAL PRIMARY KEY, version integer NOT NULL);"
    "INSERT INTO arbstr_schema (version) VALUES (1), (2);"
    "CREATE TABLE requests (id SERIAL PRIMARY KEY, \"timestamp\" double precision NOT NULL, "
    "policy character varying(128), model character varying(256), provider character varying(128), "
    "input_tokens integer, output_tokens integer, cost_sats bigint, latency_ms double precision, success boolean, "
    "error text, request_id character varying(64) NOT NULL, estimated_cost_sats bigint, next_best_cost_sats bigint, "
    "max_cost_sats bigint, cost_reported boolean NOT NULL, ttft_ms double precision, streaming boolean NOT NULL, "
    "status_code integer, usage_estimated boolean NOT NULL, attempts text NOT NULL);"
    "CREATE INDEX requests_request_id ON requests USING btree (request_id);"
    "CREATE INDEX requests_timestamp ON requests USING btree (\"timestamp\");"
    "CREATE TABLE token_ratios (id SERIAL PRIMARY KEY, policy character varying(128) NOT NULL UNIQUE, "
    "avg_ratio double precision NOT NULL, sample_count integer NOT NULL);"
    "INSERT INTO requests (timestamp, policy, model, provider, input_tokens, output_tokens, cost_sats, latency_ms,"
    " success, error, request_id, estimated_cost_sats, next_best_cost_sats, max_cost_sats, cost_reported, ttft_ms,"
    " streaming, status_code, usage_estimated, attempts) VALUES (1700000000.0, 'default', 'gpt-4o', 'old', 10, 20,"
    " 52000000, 99.0, true, NULL, 'r-old', 52510000, 100000000, 300000000, true, 12.5, true, 200, false, 'none');"
    "INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES ('code', 1.5, 7);")
"""What main's schema 2 left on PostgreSQL (from pg_dump of a database it made)."""

SCHEMA_3 = SCHEMA_2 + (
    "ALTER TABLE requests ADD COLUMN app VARCHAR(128);"
    "CREATE INDEX IF NOT EXISTS requests_app ON requests (app);"
    "INSERT INTO arbstr_schema (version) VALUES (3);")
"""Main's schema 3: the app each request is attributed to."""


@pytest.mark.parametrize("schema,first", [(SEED, ("", "old", 52_000_000, None, False)),
                                          (SCHEMA_2, ("r-old", "old", 52_000_000, 300_000_000, True)),
                                          (SCHEMA_3, ("r-old", "old", 52_000_000, 300_000_000, True))],
                         ids=["seeds", "schema-2", "schema-3"])
def test_an_old_database_is_upgraded_with_its_rows(database_url, schema, first):
    run_sql(database_url, schema)
    ledger = Ledger(database_url)
    ledger.record(replace(ROW, request_id="new"))
    applied = ledger.call(lambda: schema_applied(ledger.db))
    learned = ledger.learned
    ledger.close()
    assert query(database_url, "SELECT request_id, provider, cost_nsats, max_cost_nsats, streaming "
                               "FROM requests ORDER BY id") == [first, ("new", "alpha", 52_000_000, 300_000_000, False)]
    assert applied == [m.__name__ for m in MIGRATIONS]
    assert learned[("code", ANY_MODEL)].mean == 1.5 and learned[("code", ANY_MODEL)].count == 7
    again = Ledger(database_url)
    assert again.call(lambda: schema_applied(again.db)) == applied
    again.close()


def test_two_instances_under_load_lose_no_row_and_no_sample(database_url):
    instances = [Ledger(database_url, flush_interval=0, instance_id=f"box:{n}", reload_interval=0.1)
                 for n in (1, 2)]
    rows, samples = 600, 300

    def load(ledger: Ledger) -> None:
        for i in range(rows):
            ledger.record(replace(ROW, request_id=f"{ledger.instance_id}-{i}"))
            if i < samples:
                ledger.learn("code", "gpt-4o", 0.5 + (i % 5) / 10)

    threads = [threading.Thread(target=load, args=(ledger,)) for ledger in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each instance picks up the other's learning within its reload interval.
    for ledger in instances:
        wait_until(lambda: ledger.learned.get(("code", ANY_MODEL)) is not None
                   and ledger.learned[("code", ANY_MODEL)].count == 2 * samples)
    for ledger in instances:
        ledger.close()
    reader = Ledger(database_url)
    totals = reader.call(lambda: compute_stats(parse_window({}, NOW), "instance_id"))
    reader.close()
    assert query(database_url, "SELECT instance_id, COUNT(*) FROM requests GROUP BY instance_id ORDER BY 1") == [
        ("box:1", rows), ("box:2", rows)]
    assert query(database_url, "SELECT model, sample_count FROM output_ratios ORDER BY model") == [
        ("*", 2 * samples), ("gpt-4o", 2 * samples)]
    assert totals["totals"]["requests"] == 2 * rows
    assert [(g["instance_id"], g["requests"]) for g in totals["groups"]] == [("box:1", rows), ("box:2", rows)]


def test_a_few_seconds_of_database_outage_lose_no_row(server, database_url):
    ledger = Ledger(database_url, flush_interval=0, instance_id="box:1")
    ledger.record(replace(ROW, request_id="before"))
    wait_until(lambda: query(database_url, "SELECT COUNT(*) FROM requests") == [(1,)])
    server.stop()
    try:
        for i in range(200):
            ledger.record(replace(ROW, request_id=f"during-{i}"))
            time.sleep(0.01)
        wait_until(lambda: ledger.health().to_dict() == {"state": "failing", "backlog": 200, "rows_lost": 0})
    finally:
        server.start()
    wait_until(lambda: ledger.health().state == "ok")
    ledger.record(replace(ROW, request_id="after"))
    ledger.close()
    assert query(database_url, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests") == [(202, 202)]



def test_budget_reservations_are_exact_across_instances(database_url):
    """Several arbstr instances on one PostgreSQL share their budgets: advisory locks serialize them."""
    assert race_instances(database_url) == (33, Decimal(99))


@pytest.mark.parametrize("case", ["test_a_dead_pid_on_this_machine_is_reclaimed_at_once_at_its_expected_cost",
                                  "test_another_machine_counts_as_dead_only_after_its_heartbeat_times_out",
                                  "test_a_settlement_after_its_reservation_was_reclaimed_still_counts",
                                  "test_a_dead_owner_that_holds_nothing_is_forgotten",
                                  "test_own_and_ownerless_reservations"])
def test_what_dead_instances_reserved_is_taken_back(database_url, case):
    """The owner rules hold on PostgreSQL too, where instances on other machines share the budgets."""
    ledger = Ledger(database_url)
    try:
        getattr(test_budgets.TestDeadOwners(), case)(ledger)
    finally:
        ledger.close()
