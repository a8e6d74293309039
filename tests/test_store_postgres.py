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
import uuid
from dataclasses import replace
from decimal import Decimal

import psycopg2
import pytest

from arbstr.stats import compute_stats, parse_window
from arbstr.store import MIGRATIONS, Ledger, RequestRow, TokenRatio, schema_version

from test_stats import FIXTURE, NOW
from test_store import ROW


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    assert initdb, "PostgreSQL is not installed: `make test` installs it (apt package postgresql)"
    return os.path.dirname(initdb)


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server of its own; as root it runs as the postgres user, as PostgreSQL requires."""
    bindir = _bindir()
    root = tempfile.mkdtemp(prefix="arbstr-pg-")
    as_user = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid}
    data = os.path.join(root, "data")
    subprocess.run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, **as_user)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run([f"{bindir}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "start"],
                   check=True, capture_output=True, **as_user)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(server):
    """A fresh database for each test."""
    name = "arbstr_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(f"postgresql://postgres@{server}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    admin.close()
    return f"postgresql://postgres@{server}/{name}"


def test_rows_round_trip_exactly(database_url):
    ledger = Ledger(database_url)
    ledger.record(ROW)
    ledger.record(replace(ROW, request_id="r2", cost_sats=Decimal("0.000000001")))
    saved = ledger.call(lambda: [(r.request_id, r.cost_sats, r.success) for r in RequestRow.select().order_by(RequestRow.id)])
    ledger.close()
    assert saved == [("r1", Decimal("0.052"), True), ("r2", Decimal("0.000000001"), True)]


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


def test_ratios_upsert_and_migrations_are_idempotent(database_url):
    ledger = Ledger(database_url)
    ledger.save_ratio("code", 0.5, 1)
    ledger.save_ratio("code", 0.75, 2)
    ratios = ledger.call(lambda: [(r.policy, r.avg_ratio, r.sample_count) for r in TokenRatio.select()])
    ledger.close()
    assert ratios == [("code", 0.75, 2)]
    again = Ledger(database_url)
    assert again.call(lambda: schema_version(again.db)) == len(MIGRATIONS)
    again.close()


def test_a_seed_era_database_is_upgraded_with_its_rows(database_url):
    connection = psycopg2.connect(database_url)
    connection.autocommit = True
    connection.cursor().execute(
        "CREATE TABLE requests (id SERIAL PRIMARY KEY, timestamp DOUBLE PRECISION NOT NULL, policy VARCHAR(128), "
        "model VARCHAR(256), provider VARCHAR(128), input_tokens INTEGER, output_tokens INTEGER, cost_sats BIGINT, "
        "latency_ms DOUBLE PRECISION, success BOOLEAN, error TEXT);"
        "INSERT INTO requests (timestamp, policy, model, provider, input_tokens, output_tokens, cost_sats, latency_ms,"
        " success, error) VALUES (1700000000.0, 'default', 'gpt-4o', 'old', 10, 20, 52000000, 99.0, true, NULL);")
    connection.close()
    ledger = Ledger(database_url)
    ledger.record(replace(ROW, request_id="new"))
    rows = ledger.call(lambda: [(r.request_id, r.provider, r.cost_sats, r.streaming)
                                for r in RequestRow.select().order_by(RequestRow.id)])
    ledger.close()
    assert rows == [("", "old", Decimal("0.052"), False), ("new", "alpha", Decimal("0.052"), False)]
