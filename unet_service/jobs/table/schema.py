"""The job table's schema, in the SQL both SQLite and PostgreSQL understand alike (`BIGINT`
and `DOUBLE PRECISION` have the intended affinities in SQLite), and the steps that bring a
table written by an earlier version of the service up to date.

A new JobRecord field needs its column in SCHEMA (for new tables), a step in MIGRATIONS under
the next version that adds it to existing tables (ALTER TABLE ... ADD COLUMN, with a default
for the rows already there), and that version as SCHEMA_VERSION."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from unet_service.jobs.table.records import JOB_STATES, JobRecord

SCHEMA_VERSION = 3
TABLE = "unet_jobs"
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(JobRecord))

_states = ", ".join(f"'{s}'" for s in JOB_STATES)

SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        id TEXT PRIMARY KEY,
        owner TEXT,
        state TEXT NOT NULL CHECK (state IN ({_states})),
        params TEXT NOT NULL,
        input_name TEXT NOT NULL,
        input_bytes BIGINT NOT NULL,
        input_type TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        tiles_total BIGINT NOT NULL DEFAULT 0,
        tiles_done BIGINT NOT NULL DEFAULT 0,
        pages_total BIGINT NOT NULL DEFAULT 0,
        pages_done BIGINT NOT NULL DEFAULT 0,
        result_bytes BIGINT NOT NULL DEFAULT 0,
        result_type TEXT,
        result_name TEXT,
        error TEXT,
        worker TEXT,
        lease_until DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        attempt_started_at DOUBLE PRECISION,
        reserved_bytes BIGINT NOT NULL DEFAULT 0,
        tiles_resumed BIGINT NOT NULL DEFAULT 0
    )""",
    # claim() scans by state and age, list() by owner and age, the TTL sweep by finish time.
    f"CREATE INDEX IF NOT EXISTS {TABLE}_by_state ON {TABLE} (state, created_at)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_by_owner ON {TABLE} (owner, created_at)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_by_finish ON {TABLE} (finished_at)",
    f"CREATE TABLE IF NOT EXISTS {TABLE}_schema (version INTEGER NOT NULL)",
)

# Version -> the statements that upgrade a table of the version before it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # When the running attempt began (the ETA's base; started_at stays the first start), and
    # the result bytes a job holds in the quota until its result is written.
    2: (
        f"ALTER TABLE {TABLE} ADD COLUMN attempt_started_at DOUBLE PRECISION",
        f"ALTER TABLE {TABLE} ADD COLUMN reserved_bytes BIGINT NOT NULL DEFAULT 0",
    ),
    # The tiles a resumed attempt found done (OME-Zarr results resume block by block).
    3: (f"ALTER TABLE {TABLE} ADD COLUMN tiles_resumed BIGINT NOT NULL DEFAULT 0",),
}


def create_or_upgrade(run: Callable[..., Any], lock: str | None) -> None:
    """Create the table, or upgrade one of an earlier version, inside one write transaction
    (`run(sql, params)` runs a statement in it), after taking `lock` where the database has
    one: the check and the upgrade are one step, so two replicas starting at once upgrade it
    once."""
    if lock:
        run(lock)
    for statement in SCHEMA:
        run(statement)
    row = run(f"SELECT max(version) FROM {TABLE}_schema").fetchone()
    found = row[0] if row else None
    if found is None:
        run(f"INSERT INTO {TABLE}_schema VALUES (?)", (SCHEMA_VERSION,))
        return
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"the job table has schema version {found}, written by a newer version "
            f"of the service; this one knows up to version {SCHEMA_VERSION}"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version]:
            run(statement)
    if found < SCHEMA_VERSION:
        run(f"UPDATE {TABLE}_schema SET version = ?", (SCHEMA_VERSION,))
