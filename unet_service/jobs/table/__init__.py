"""The job table of the asynchronous job API: one row per accepted job, so that a restart or
another replica finds every job again.

One small interface (`JobTable`) with two implementations that share their SQL
(`sql.py`): SQLite, the embedded default (nothing to run, one host), and
PostgreSQL, for several replicas. `connect.open_job_table(url)` picks one from the URL;
`records` holds the record and the interface. Every method is
synchronous and safe to call from several threads at once; the service calls them through
`asyncio.to_thread`.

A job's way through the table: `create` (queued) -> `claim` by one worker (running, with a
lease that `progress` renews; each claim is an attempt, whose progress starts from 0) ->
`finish` (done or failed), or `cancel` (cancelled) at any time before that. A worker that
dies stops renewing its lease; once the lease has expired the job may be claimed again, and
a job interrupted `max_attempts` times is failed with the reason instead of being tried
forever. A worker that stops cleanly `release`s its jobs, which does not count as an attempt.
(`schema.py` creates the table, and upgrades one of an earlier version.)
"""
