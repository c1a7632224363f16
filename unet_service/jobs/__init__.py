"""Section jobs: the per-replica worker, one job's computation, files on disk and the
job table (SQLite or PostgreSQL)."""
