"""The job table's SQL and record mapping, shared by SQLite and PostgreSQL: a backend only says
how to get a cursor inside a transaction (`_read`, `_write`) and how its driver spells
placeholders. The statements use the subset both databases understand the same way; the
schema and its upgrades are in `schema.py`."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from unet_service.jobs.table.records import (
    FINISHED_STATES,
    JOB_STATES,
    Clock,
    JobExists,
    JobRecord,
    JobState,
)
from unet_service.jobs.table.schema import COLUMNS, TABLE, create_or_upgrade

SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
UNFINISHED = "state IN ('queued', 'running')"

_finished = ", ".join(f"'{s}'" for s in FINISHED_STATES)


class Cursor(Protocol):
    """What both sqlite3's and psycopg's cursors offer."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def to_row(record: JobRecord) -> tuple[Any, ...]:
    values = {f: getattr(record, f) for f in COLUMNS}
    values["params"] = json.dumps(record.params)
    return tuple(values[f] for f in COLUMNS)


def to_record(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    values["params"] = json.loads(values["params"])
    return JobRecord(**values)


def interrupted(attempts: int) -> str:
    times = "time" if attempts == 1 else "times"
    return f"interrupted {attempts} {times} (the server stopped while working on it)"


class SqlJobTable(ABC):
    """The whole JobTable interface in SQL with `?` placeholders."""

    # The driver's exceptions for a duplicate primary key (create() turns them into JobExists).
    duplicate_errors: tuple[type[BaseException], ...] = ()
    # Appended to claim()'s SELECT: PostgreSQL locks the row it takes and skips the rows other
    # claimers hold; SQLite needs nothing, its write transaction already excludes them.
    claim_lock = ""
    # Run first when creating the schema, to serialise processes that open the table at once
    # (SQLite's write transaction already does).
    schema_lock = ""

    def __init__(self, clock: Clock) -> None:
        self._now = clock

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reading."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[Cursor]:
        """A cursor inside a transaction that holds the write lock from its start (so that a
        read followed by a write in it cannot interleave with another writer), committed at
        the end, rolled back on an exception."""

    def _sql(self, sql: str) -> str:
        return sql

    def _run(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur.execute(self._sql(sql), params)
        return cur

    def _create_schema(self) -> None:
        with self._write() as cur:
            create_or_upgrade(lambda sql, *params: self._run(cur, sql, *params), self.schema_lock)

    def _get(self, cur: Cursor, job_id: str) -> JobRecord | None:
        row = self._run(cur, f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        return to_record(row) if row else None

    def create(self, record: JobRecord) -> None:
        placeholders = ", ".join("?" * len(COLUMNS))
        try:
            with self._write() as cur:
                self._run(
                    cur,
                    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                    to_row(record),
                )
        except self.duplicate_errors as e:
            raise JobExists(f"there is already a job {record.id}") from e

    def _update_one(self, sql: str, params: Sequence[Any]) -> bool:
        with self._write() as cur:
            return self._run(cur, sql, params).rowcount == 1

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as cur:
            return self._get(cur, job_id)

    def list(
        self,
        owner: str | None,
        *,
        all_owners: bool = False,
        limit: int = 1000,
        states: Sequence[JobState] = (),
        before: tuple[float, str] | None = None,
    ) -> list[JobRecord]:
        where: list[str] = []
        params: list[Any] = []
        if not all_owners:
            where.append("owner IS NULL" if owner is None else "owner = ?")
            params += [] if owner is None else [owner]
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [before[0], before[0], before[1]]
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        with self._read() as cur:
            self._run(
                cur,
                f"{SELECT}{condition} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, limit),
            )
            return [to_record(row) for row in cur.fetchall()]

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> JobRecord | None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        with self._write() as cur:
            while True:
                now = self._now()
                row = self._run(
                    cur,
                    f"{SELECT} WHERE state = 'queued' OR (state = 'running' AND lease_until < ?)"
                    f" ORDER BY created_at, id LIMIT 1 {self.claim_lock}",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                job = to_record(row)
                if job.attempts < max_attempts:
                    break
                # Its earlier workers all died holding it: likely it kills them, so stop here.
                self._run(
                    cur,
                    f"UPDATE {TABLE} SET state = 'failed', error = ?, finished_at = ?,"
                    " updated_at = ?, lease_until = NULL WHERE id = ?",
                    (interrupted(job.attempts), now, now, job.id),
                )
            self._run(
                cur,
                f"UPDATE {TABLE} SET state = 'running', worker = ?, lease_until = ?,"
                " attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
                " attempt_started_at = ?, tiles_done = 0, tiles_resumed = 0, pages_done = 0,"
                " updated_at = ?"
                " WHERE id = ?",
                (worker, now + lease_s, now, now, now, job.id),
            )
            return self._get(cur, job.id)

    def progress(
        self,
        job_id: str,
        worker: str,
        *,
        tiles_done: int,
        tiles_total: int,
        pages_done: int,
        pages_total: int,
        lease_s: float,
        tiles_resumed: int = 0,
    ) -> bool:
        now = self._now()
        return self._update_one(
            f"UPDATE {TABLE} SET tiles_done = ?, tiles_total = ?, pages_done = ?,"
            " pages_total = ?, tiles_resumed = ?, lease_until = ?, updated_at = ?"
            " WHERE id = ? AND state = 'running' AND worker = ?",
            (
                *(tiles_done, tiles_total, pages_done, pages_total, tiles_resumed),
                *(now + lease_s, now, job_id, worker),
            ),
        )

    def finish(
        self,
        job_id: str,
        worker: str,
        state: Literal["done", "failed"],
        *,
        error: str | None = None,
        result_bytes: int = 0,
        result_type: str | None = None,
        result_name: str | None = None,
    ) -> bool:
        if state not in ("done", "failed"):
            raise ValueError(f"a job finishes done or failed, not {state}")
        now = self._now()
        return self._update_one(
            f"UPDATE {TABLE} SET state = ?, error = ?, result_bytes = ?, result_type = ?,"
            " result_name = ?, finished_at = ?, updated_at = ?, lease_until = NULL"
            " WHERE id = ? AND state = 'running' AND worker = ?",
            (state, error, result_bytes, result_type, result_name, now, now, job_id, worker),
        )

    def cancel(self, job_id: str) -> JobRecord | None:
        now = self._now()
        with self._write() as cur:
            self._run(
                cur,
                f"UPDATE {TABLE} SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                f" lease_until = NULL WHERE id = ? AND {UNFINISHED}",
                (now, now, job_id),
            )
            return self._get(cur, job_id)

    def delete(self, job_id: str) -> bool:
        return self._update_one(f"DELETE FROM {TABLE} WHERE id = ?", (job_id,))

    def release(self, worker: str) -> int:
        with self._write() as cur:
            return self._run(
                cur,
                f"UPDATE {TABLE} SET state = 'queued', worker = NULL, lease_until = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, updated_at = ?"
                " WHERE state = 'running' AND worker = ?",
                (self._now(), worker),
            ).rowcount

    def expire(self, worker: str) -> int:
        with self._write() as cur:
            return self._run(
                cur,
                f"UPDATE {TABLE} SET lease_until = 0, updated_at = ?"
                " WHERE state = 'running' AND worker = ?",
                (self._now(), worker),
            ).rowcount

    def finished_before(self, t: float) -> list[str]:
        with self._read() as cur:
            self._run(
                cur,
                f"SELECT id FROM {TABLE} WHERE state IN ({_finished}) AND finished_at < ?"
                " ORDER BY finished_at",
                (t,),
            )
            return [row[0] for row in cur.fetchall()]

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._read() as cur:
            self._run(cur, f"SELECT state, count(*) FROM {TABLE} GROUP BY state")
            counts.update({state: int(n) for state, n in cur.fetchall()})
        return counts

    def stored_bytes(self) -> int:
        with self._read() as cur:
            row = self._run(
                cur, f"SELECT COALESCE(sum(input_bytes + result_bytes), 0) FROM {TABLE}"
            ).fetchone()
        return int(row[0])

    def reserved(self) -> dict[str, int]:
        with self._read() as cur:
            self._run(
                cur,
                f"SELECT id, reserved_bytes FROM {TABLE} WHERE {UNFINISHED} AND reserved_bytes > 0",
            )
            return {job_id: int(n) for job_id, n in cur.fetchall()}
