"""The wallet's tables, in arbstr's own database (SQLite or PostgreSQL), with their own migrations.

They are the only tables that hold ecash (proof secrets and signatures) and wallet-made node
keys: no other table, log line or API answer ever does. Every function here runs on the ledger's
database thread (`Ledger.call`/`submit`), one transaction each, so a crash leaves either the
state before a step or the state after it, never half of one.

Proof states: `unspent` (ours to spend), `reserved` (inside an operation not finished yet:
inputs of a swap, or a token handed out whose fate is not known), `incoming` (received from
someone else, e.g. a node's change, not yet swapped into proofs only we know), `spent`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peewee
from playhouse.shortcuts import ThreadSafeDatabaseMetadata


class _Base(peewee.Model):
    class Meta:
        model_metadata_class = ThreadSafeDatabaseMetadata


class WalletProof(_Base):
    mint = peewee.TextField()
    keyset_id = peewee.CharField(max_length=80)
    amount_sats = peewee.BigIntegerField()
    secret = peewee.TextField(unique=True)
    signature = peewee.TextField()
    """The unblinded signature C, hex."""
    state = peewee.CharField(max_length=16, index=True)
    operation = peewee.IntegerField(null=True, index=True)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "wallet_proofs"


class WalletOperation(_Base):
    """One step that moves ecash: a mint, a swap, a token handed out, a token received."""

    kind = peewee.CharField(max_length=16)
    """mint, receive, send (a token handed to the user), pay (a token handed to a node)."""
    state = peewee.CharField(max_length=16, index=True)
    """quoted, swapping, pending (a token is out, fate unknown), owed (an X-Cashu payment the node
    took whose change is still to be collected from it), done, returned, failed."""
    mint = peewee.TextField()
    amount_sats = peewee.BigIntegerField()
    provider = peewee.CharField(max_length=128, null=True)
    request_id = peewee.CharField(max_length=64, null=True)
    purpose = peewee.CharField(max_length=16, default="")
    """For `pay`: key (a node key made from the token), topup, xcashu."""
    quote = peewee.TextField(null=True)
    """For `mint`: the mint's quote id (it mints the paid amount once: kept here only)."""
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "wallet_operations"


class WalletOutput(_Base):
    """A blinded message sent (or about to be sent) for signing: what NUT-09 restore needs."""

    operation = peewee.IntegerField(index=True)
    keyset_id = peewee.CharField(max_length=80)
    amount_sats = peewee.BigIntegerField()
    secret = peewee.TextField()
    blinding_factor = peewee.TextField()
    blinded_message = peewee.TextField()
    keep = peewee.BooleanField(default=True)
    """False for the outputs of a swap that become the token handed out."""

    class Meta:
        table_name = "wallet_outputs"


class WalletEvent(_Base):
    """What the wallet history shows: amounts only, never a token."""

    timestamp = peewee.DoubleField(index=True)
    kind = peewee.CharField(max_length=16)
    amount_sats = peewee.BigIntegerField()
    """Signed: + into the wallet, - out of it."""
    mint = peewee.TextField(default="")
    provider = peewee.CharField(max_length=128, null=True)
    request_id = peewee.CharField(max_length=64, null=True)
    note = peewee.TextField(default="")

    class Meta:
        table_name = "wallet_events"


class WalletKey(_Base):
    """A key at a node that the wallet funded (`payment = "wallet"`); its balance is the wallet's."""

    provider = peewee.CharField(max_length=128, index=True)
    url = peewee.TextField()
    api_key = peewee.TextField(unique=True)
    funded_sats = peewee.BigIntegerField(default=0)
    state = peewee.CharField(max_length=16, default="active")
    """active (requests use it), refunding (written before its refund is asked for, and never used
    again: a node answers a refund asked twice with the same token only while the key stays empty),
    refunded, void (its token was never redeemed: the node does not know it)."""
    created_at = peewee.DoubleField()
    used_at = peewee.DoubleField()

    class Meta:
        table_name = "wallet_keys"


class WalletSchema(_Base):
    version = peewee.IntegerField()

    class Meta:
        table_name = "wallet_schema"
        primary_key = False  # one column, the version: PostgreSQL has no id to return


MODELS = [WalletProof, WalletOperation, WalletOutput, WalletEvent, WalletKey, WalletSchema]


def _wallet_1(db: peewee.Database) -> None:
    """Proofs, operations, blinded outputs, history and wallet-made keys."""
    sqlite = isinstance(db, peewee.SqliteDatabase)
    key = "INTEGER PRIMARY KEY" if sqlite else "SERIAL PRIMARY KEY"
    real = "REAL" if sqlite else "DOUBLE PRECISION"
    tables = {
        "wallet_proofs": f"id {key}, mint TEXT NOT NULL, keyset_id VARCHAR(80) NOT NULL, amount_sats BIGINT NOT NULL, "
                         f"secret TEXT NOT NULL UNIQUE, signature TEXT NOT NULL, state VARCHAR(16) NOT NULL, "
                         f"operation INTEGER, created_at {real} NOT NULL",
        "wallet_operations": f"id {key}, kind VARCHAR(16) NOT NULL, state VARCHAR(16) NOT NULL, mint TEXT NOT NULL, "
                             f"amount_sats BIGINT NOT NULL, provider VARCHAR(128), request_id VARCHAR(64), "
                             f"purpose VARCHAR(16) NOT NULL DEFAULT '', quote TEXT, created_at {real} NOT NULL, "
                             f"updated_at {real} NOT NULL",
        "wallet_outputs": f"id {key}, operation INTEGER NOT NULL, keyset_id VARCHAR(80) NOT NULL, "
                          f"amount_sats BIGINT NOT NULL, secret TEXT NOT NULL, blinding_factor TEXT NOT NULL, "
                          f"blinded_message TEXT NOT NULL, keep BOOLEAN NOT NULL DEFAULT TRUE",
        "wallet_events": f"id {key}, timestamp {real} NOT NULL, kind VARCHAR(16) NOT NULL, amount_sats BIGINT NOT NULL, "
                         f"mint TEXT NOT NULL DEFAULT '', provider VARCHAR(128), request_id VARCHAR(64), "
                         f"note TEXT NOT NULL DEFAULT ''",
        "wallet_keys": f"id {key}, provider VARCHAR(128) NOT NULL, url TEXT NOT NULL, api_key TEXT NOT NULL UNIQUE, "
                       f"funded_sats BIGINT NOT NULL DEFAULT 0, state VARCHAR(16) NOT NULL DEFAULT 'active', "
                       f"created_at {real} NOT NULL, used_at {real} NOT NULL",
    }
    for table, columns in tables.items():
        db.execute_sql(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
    for table, column in (("wallet_proofs", "state"), ("wallet_proofs", "operation"),
                          ("wallet_operations", "state"), ("wallet_outputs", "operation"),
                          ("wallet_events", "timestamp"), ("wallet_keys", "provider")):
        db.execute_sql(f"CREATE INDEX IF NOT EXISTS {table}_{column} ON {table} ({column})")


MIGRATIONS: list[Callable[[peewee.Database], None]] = [_wallet_1]
"""The wallet's own numbered migrations (its own version table, so it evolves apart from the ledger's)."""


def open_wallet_tables(db: peewee.Database) -> None:
    """Bind the wallet's models to `db` on this (the database) thread and bring its schema up to date."""
    db.bind(MODELS)
    with db.atomic():
        db.execute_sql("CREATE TABLE IF NOT EXISTS wallet_schema (version INTEGER NOT NULL)")
        current = WalletSchema.select(peewee.fn.MAX(WalletSchema.version)).scalar() or 0
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number > current:
                migration(db)
                WalletSchema.insert(version=number).execute()


def now() -> float:
    return time.time()
