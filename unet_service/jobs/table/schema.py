"""The job table's schema, in the SQL both SQLite and PostgreSQL understand alike (`BIGINT`
and `DOUBLE PRECISION` have the intended affinities in SQLite), and the steps that bring a
table written by an earlier version of the service up to date.

A new JobRecord field needs its column in SCHEMA (for new tables), a step in MIGRATIONS under
the next version that adds it to existing tables (ALTER TABLE ... ADD COLUMN, with a default
for the rows already there), and that version as SCHEMA_VERSION."""

from __future__ import annotations

from dataclasses import fields

from unet_service.jobs.table import JOB_STATES, JobRecord

SCHEMA_VERSION = 2
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
        reserved_bytes BIGINT NOT NULL DEFAULT 0
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
}
