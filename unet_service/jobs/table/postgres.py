"""The job table on PostgreSQL (psycopg 3 with its connection pool), for several replicas: every
replica sees the same jobs, and `claim` hands each job to exactly one of them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import cache

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from unet_service.jobs.table.records import Clock
from unet_service.jobs.table.sql import Cursor, SqlJobTable

# Connections per process. Every call is a short transaction, so a few serve many threads; the
# server's max_connections (100 by default) bounds replicas x POOL_SIZE.
POOL_SIZE = 4
CONNECT_TIMEOUT_S = 10.0
# Any constant shared by all replicas: the advisory lock that serialises creating the schema.
SCHEMA_LOCK_KEY = 0x756E_6574  # "unet"


@cache
def _percent_s(sql: str) -> str:
    # psycopg's placeholder; the shared statements contain no other `?` and no `%`.
    return sql.replace("?", "%s")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class PostgresJobTable(SqlJobTable):
    duplicate_errors = (psycopg.errors.UniqueViolation,)
    # Take the oldest claimable row that no other claimer holds right now, and hold it until
    # this transaction commits: concurrent claimers get different jobs, and never wait.
    claim_lock = "FOR UPDATE SKIP LOCKED"
    # CREATE TABLE IF NOT EXISTS is not safe against itself in two sessions at once.
    schema_lock = f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"

    def __init__(self, url: str, *, clock: Clock) -> None:
        super().__init__(clock)
        # One plain connection first: an unreachable server or a wrong password is reported
        # at once with the driver's reason, where the pool would retry until its timeout.
        try:
            psycopg.connect(url, connect_timeout=int(CONNECT_TIMEOUT_S)).close()
        except psycopg.OperationalError as e:
            raise RuntimeError(
                f"cannot connect to the job table's PostgreSQL server at {redact(url)}: {e}"
            ) from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            # A connection that the server or the network dropped is replaced, not handed out.
            check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": int(CONNECT_TIMEOUT_S)},
            name="unet-jobs",
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout:
            self._pool.close()
            raise RuntimeError(
                f"cannot connect to the job table's PostgreSQL server at {redact(url)} "
                f"within {CONNECT_TIMEOUT_S:g} s"
            ) from None
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    def _sql(self, sql: str) -> str:
        return _percent_s(sql)

    @contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        # The pool's connection block commits when it ends and rolls back on an exception.
        with self._pool.connection() as conn, conn.cursor() as cur:
            yield cur

    def _read(self) -> AbstractContextManager[Cursor]:
        return self._transaction()

    def _write(self) -> AbstractContextManager[Cursor]:
        # Row locks (claim's FOR UPDATE) and single-statement updates give PostgreSQL's
        # default isolation all it needs; no table lock is taken.
        return self._transaction()

    def close(self) -> None:
        self._pool.close()
