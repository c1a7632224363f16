"""The embedded job table: one SQLite file, safe for several threads and several processes on
one host. Not for several hosts sharing the file over a network volume: SQLite's locks are not
reliable there (use PostgreSQL, deploy/kubernetes/README.md)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unet_service.jobs.table.records import Clock
from unet_service.jobs.table.sql import Cursor, SqlJobTable

# How long a writer waits for another's transaction before giving up. Transactions here are a
# few statements long, so reaching this means something is stuck, not busy.
BUSY_TIMEOUT_S = 30.0


class SqliteJobTable(SqlJobTable):
    duplicate_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path, *, clock: Clock) -> None:
        super().__init__(clock)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A connection per thread: a sqlite3 connection is not safe to share between threads
        # without a lock of our own, and SQLite's own locking already orders the threads.
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Condition()
        self._closed = False
        self._busy = 0  # operations in progress: close() waits for them
        self._create_schema()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise RuntimeError("the job table is closed")
            # isolation_level=None: transactions are opened explicitly below, never implicitly.
            # check_same_thread=False only so that close() may close every thread's connection.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._connections.append(conn)
        # WAL: readers never wait for the writer. FULL: a committed job survives a power cut,
        # not only a crash of the process (WAL with NORMAL may lose the last commits).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._local.conn = conn
        return conn

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The thread's connection, counted as in use: a call still running in a worker
        thread when the service stops (its caller cancelled) must not have its connection
        closed under it, which crashes the interpreter inside SQLite."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job table is closed")
            self._busy += 1
        try:
            yield self._connection()
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        with self._using() as conn:
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        with self._using() as conn, self._transaction(conn) as cur:
            yield cur

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[Cursor]:
        # IMMEDIATE takes the write lock now (waiting up to the busy timeout), not at the first
        # write: two claimers can then never both read the same queued job, and a read-then-write
        # transaction never fails with "database is locked" halfway through.
        conn.execute("BEGIN IMMEDIATE")
        cur = conn.cursor()
        try:
            yield cur
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._busy == 0, timeout=2 * BUSY_TIMEOUT_S)
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
