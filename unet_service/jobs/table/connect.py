"""The job table a URL names: SQLite (one host) or PostgreSQL (several replicas)."""

from __future__ import annotations

import time

from unet_service.jobs.table.records import Clock, JobTable


def open_job_table(url: str, *, clock: Clock = time.time) -> JobTable:
    """`sqlite:///abs/path.sqlite3` or `postgresql://user:pw@host:port/db` (`postgres://`
    too). `clock` is the time source for leases and time stamps (tests pass their own)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite":
        from unet_service.jobs.table.sqlite import SqliteJobTable

        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"a SQLite job table needs an absolute path (sqlite:///PATH): {url}")
        return SqliteJobTable(rest, clock=clock)
    if sep and scheme in ("postgresql", "postgres"):
        # Imported here, so that the SQLite default works without psycopg's libraries loaded.
        from unet_service.jobs.table.postgres import PostgresJobTable

        return PostgresJobTable(url, clock=clock)
    raise ValueError(
        "the job table URL must start with sqlite:/// or postgresql:// (or postgres://), "
        f"not {url.split('://')[0]!r}"
    )
