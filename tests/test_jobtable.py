"""The job table's contract, run unchanged against both backends: embedded SQLite and a real
PostgreSQL server that this session starts (tests/postgres_server.py). Leases are timed by a
clock the tests move, so nothing here waits for time to pass."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_server import PostgresServer
from pydantic import ValidationError

from unet_service.jobs.table.connect import open_job_table
from unet_service.jobs.table.postgres import redact
from unet_service.jobs.table.records import JobExists, JobRecord, JobTable
from unet_service.jobs.table.schema import SCHEMA_VERSION
from unet_service.jobs.table.sql import COLUMNS, TABLE, interrupted
from unet_service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs/jobs.sqlite3"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(url: str, clock: Clock) -> Iterator[JobTable]:
    t = open_job_table(url, clock=clock)
    yield t
    t.close()


def job(job_id: str, created_at: float = T0, owner: str | None = None, **kw: object) -> JobRecord:
    values: dict = {
        "id": job_id,
        "owner": owner,
        "state": "queued",
        "params": {"output": "mask", "tta": 8, "threshold": 0.5, "names": ["é", None]},
        "input_name": f"{job_id}.tif",
        "input_bytes": 1000,
        "input_type": "image/tiff",
        "created_at": created_at,
        "started_at": None,
        "finished_at": None,
        "updated_at": created_at,
    }
    return JobRecord(**(values | kw))


def raw_sql(url: str, sql: str) -> None:
    """Run one statement past the interface, as an older or newer service might."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(url) as conn:
            conn.execute(sql)


def test_create_get_and_survive_a_restart(url: str, table: JobTable, clock: Clock) -> None:
    record = job("a", owner="owner-1", tiles_total=4, result_name="a-mask.tif")
    table.create(record)
    assert table.get("a") == record
    assert table.get("missing") is None
    with pytest.raises(JobExists, match="already a job a"):
        table.create(job("a"))
    table.close()
    # A new process (a restart, or another replica) finds the same job.
    reopened = open_job_table(url, clock=clock)
    try:
        assert reopened.get("a") == record
    finally:
        reopened.close()


def test_list_by_owner_newest_first(table: JobTable) -> None:
    for i, owner in enumerate(["x", None, "x", "y", None]):
        table.create(job(f"j{i}", created_at=T0 + i, owner=owner))
    assert [j.id for j in table.list("x")] == ["j2", "j0"]
    assert [j.id for j in table.list(None)] == ["j4", "j1"]
    assert [j.id for j in table.list("nobody")] == []
    assert [j.id for j in table.list(None, all_owners=True)] == ["j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in table.list("x", all_owners=True, limit=2)] == ["j4", "j3"]


def test_list_pages_through_the_jobs_by_state(table: JobTable, clock: Clock) -> None:
    # Two pairs created in the same instant: the id orders them, and a page may end
    # between the two of a pair.
    times = [T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2.5, T0 + 2.5, T0 + 3]
    for i, created in enumerate(times):
        table.create(job(f"j{i}", created_at=created, owner="x"))
    table.create(job("other", created_at=T0 + 2, owner="y"))
    newest_first = ["j6", "j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in table.list("x")] == newest_first
    for size in (1, 2, 3, 7):
        seen: list[str] = []
        before = None
        while page := table.list("x", limit=size, before=before):
            seen += [j.id for j in page]
            before = (page[-1].created_at, page[-1].id)
        assert seen == newest_first, size
    assert [j.id for j in table.list("x", before=(T0 + 2.5, "j5"))] == newest_first[2:]
    # By state: the claimed one (the oldest) is running, one finished, the rest queued.
    assert table.claim("w", lease_s=60, max_attempts=3) is not None
    assert table.cancel("j3") is not None
    assert [j.id for j in table.list("x", states=["running"])] == ["j0"]
    both = table.list("x", states=["running", "cancelled"], limit=1)
    assert [j.id for j in both] == ["j3"]
    assert [j.id for j in table.list("x", states=["running", "cancelled"])] == ["j3", "j0"]
    assert table.list("x", states=["done"]) == []
    assert [j.id for j in table.list("y", states=["queued"])] == ["other"]


def test_each_attempt_starts_its_clock_and_its_progress_anew(table: JobTable, clock: Clock) -> None:
    table.create(job("a"))
    clock.advance(10)
    first = table.claim("w1", lease_s=60, max_attempts=3)
    assert first is not None
    assert first.started_at == first.attempt_started_at == T0 + 10
    assert table.progress(
        "a", "w1", tiles_done=90, tiles_total=100, pages_done=2, pages_total=3, lease_s=60
    )
    clock.advance(3000)  # w1's replica died long ago; another takes the job
    second = table.claim("w2", lease_s=60, max_attempts=3)
    assert second is not None
    assert second.started_at == T0 + 10  # the first start, kept
    assert second.attempt_started_at == T0 + 3010
    assert (second.tiles_done, second.pages_done) == (0, 0)
    assert (second.tiles_total, second.pages_total) == (100, 3)


def test_reservations_are_held_by_unfinished_jobs_only(table: JobTable) -> None:
    for i, reserved in enumerate([100, 200, 300, 0, 500]):
        table.create(job(f"j{i}", created_at=T0 + i, reserved_bytes=reserved))
    assert table.reserved() == {"j0": 100, "j1": 200, "j2": 300, "j4": 500}
    assert table.claim("w", lease_s=60, max_attempts=3) is not None  # j0 runs: still held
    assert table.finish("j0", "w", "done", result_bytes=80)
    assert table.cancel("j1") is not None
    assert table.reserved() == {"j2": 300, "j4": 500}
    assert table.get("j0").reserved_bytes == 100  # type: ignore[union-attr]  # as reserved


def test_claim_progress_finish(table: JobTable, clock: Clock) -> None:
    table.create(job("old", created_at=T0))
    table.create(job("new", created_at=T0 + 1))
    clock.advance(10)
    got = table.claim("w1", lease_s=60, max_attempts=3)
    assert got is not None and got.id == "old"
    assert (got.state, got.worker, got.attempts) == ("running", "w1", 1)
    assert got.started_at == got.updated_at == clock.now and got.lease_until == clock.now + 60

    clock.advance(5)
    assert table.progress(
        "old", "w1", tiles_done=3, tiles_total=8, pages_done=1, pages_total=2, lease_s=60
    )
    now = table.get("old")
    assert now is not None
    assert (now.tiles_done, now.tiles_total, now.pages_done, now.pages_total) == (3, 8, 1, 2)
    assert now.lease_until == clock.now + 60
    assert not table.progress(
        "old", "w2", tiles_done=3, tiles_total=8, pages_done=1, pages_total=2, lease_s=60
    )

    assert not table.finish("old", "w2", "done")
    assert table.finish(
        "old", "w1", "done", result_bytes=500, result_type="image/tiff", result_name="o.tif"
    )
    done = table.get("old")
    assert done is not None
    assert (done.state, done.result_bytes, done.result_type, done.result_name) == (
        "done",
        500,
        "image/tiff",
        "o.tif",
    )
    assert done.finished_at == clock.now and done.lease_until is None and done.error is None
    # Finished is final: no second finish, no progress.
    assert not table.finish("old", "w1", "failed", error="late")
    assert not table.progress(
        "old", "w1", tiles_done=8, tiles_total=8, pages_done=2, pages_total=2, lease_s=60
    )

    second = table.claim("w1", lease_s=60, max_attempts=3)
    assert second is not None and second.id == "new"
    assert table.finish("new", "w1", "failed", error="the TIFF is truncated at page 3")
    failed = table.get("new")
    assert failed is not None and failed.error == "the TIFF is truncated at page 3"
    assert table.claim("w1", lease_s=60, max_attempts=3) is None


def test_an_expired_lease_lets_another_worker_take_the_job(table: JobTable, clock: Clock) -> None:
    table.create(job("a"))
    assert table.claim("w1", lease_s=60, max_attempts=3) is not None
    clock.advance(59)
    assert table.claim("w2", lease_s=60, max_attempts=3) is None
    clock.advance(2)
    # w1's replica died: its lease ran out without being renewed.
    taken = table.claim("w2", lease_s=60, max_attempts=3)
    assert taken is not None and (taken.worker, taken.attempts) == ("w2", 2)
    assert taken.started_at == T0  # first started, not restarted
    # The old worker, should it come back, has lost the job.
    assert not table.progress(
        "a", "w1", tiles_done=1, tiles_total=2, pages_done=0, pages_total=1, lease_s=60
    )
    assert not table.finish("a", "w1", "done")
    assert table.finish("a", "w2", "done")


def test_a_job_interrupted_max_attempts_times_fails_with_the_reason(
    table: JobTable, clock: Clock
) -> None:
    table.create(job("doomed", created_at=T0))
    table.create(job("next", created_at=T0 + 1))
    for worker in ("w1", "w2"):
        got = table.claim(worker, lease_s=10, max_attempts=2)
        assert got is not None and got.id == "doomed"
        clock.advance(11)
    # Its two workers died on it: it is failed, and the next job is taken instead.
    got = table.claim("w3", lease_s=10, max_attempts=2)
    assert got is not None and got.id == "next"
    doomed = table.get("doomed")
    assert doomed is not None
    assert (doomed.state, doomed.error, doomed.attempts) == ("failed", interrupted(2), 2)
    assert doomed.error == "interrupted 2 times (the server stopped while working on it)"
    assert doomed.finished_at == clock.now and doomed.lease_until is None
    with pytest.raises(ValueError, match="at least 1"):
        table.claim("w3", lease_s=10, max_attempts=0)


def test_release_requeues_without_counting_the_attempt(table: JobTable, clock: Clock) -> None:
    for i in range(3):
        table.create(job(f"j{i}", created_at=T0 + i))
    assert table.claim("w1", lease_s=60, max_attempts=1) is not None
    assert table.claim("w1", lease_s=60, max_attempts=1) is not None
    assert table.claim("w2", lease_s=60, max_attempts=1) is not None
    assert table.release("w1") == 2
    assert table.release("w1") == 0
    back = table.get("j0")
    assert back is not None
    assert (back.state, back.worker, back.lease_until, back.attempts) == ("queued", None, None, 0)
    # Even with max_attempts=1 the released jobs run again: a clean stop is no interruption.
    again = table.claim("w3", lease_s=60, max_attempts=1)
    assert again is not None and again.id == "j0" and again.attempts == 1
    still = table.get("j2")
    assert still is not None and still.worker == "w2"


def test_cancel(table: JobTable, clock: Clock) -> None:
    table.create(job("finished", created_at=T0))
    table.create(job("running", created_at=T0 + 1))
    first = table.claim("w", lease_s=60, max_attempts=3)
    assert first is not None and first.id == "finished" and table.finish("finished", "w", "done")
    running = table.claim("w", lease_s=60, max_attempts=3)
    assert running is not None and running.id == "running"
    table.create(job("queued", created_at=T0 + 2))

    clock.advance(7)
    cancelled = table.cancel("queued")
    assert cancelled is not None
    assert (cancelled.state, cancelled.finished_at) == ("cancelled", clock.now)
    stopped = table.cancel("running")
    assert stopped is not None and stopped.state == "cancelled" and stopped.lease_until is None
    # Its worker finds out at its next progress report, and cannot finish it any more.
    assert not table.progress(
        "running", "w", tiles_done=1, tiles_total=2, pages_done=0, pages_total=1, lease_s=60
    )
    assert not table.finish("running", "w", "done")
    unchanged = table.cancel("finished")
    assert unchanged is not None and unchanged.state == "done"
    assert unchanged.finished_at == T0
    assert table.cancel("missing") is None
    assert table.claim("w", lease_s=60, max_attempts=3) is None


def test_delete_counts_bytes_and_ttl(table: JobTable, clock: Clock) -> None:
    assert table.count_by_state() == dict.fromkeys(
        ["queued", "running", "done", "failed", "cancelled"], 0
    )
    assert table.stored_bytes() == 0
    for i in range(4):
        table.create(job(f"j{i}", created_at=T0 + i, input_bytes=100 * (i + 1)))
    a = table.claim("w", lease_s=60, max_attempts=3)
    assert a is not None and table.finish(a.id, "w", "done", result_bytes=7)
    clock.advance(100)
    b = table.claim("w", lease_s=60, max_attempts=3)
    assert b is not None and table.finish(b.id, "w", "failed", error="bad")
    clock.advance(100)
    assert table.cancel("j2") is not None
    assert table.claim("w", lease_s=60, max_attempts=3) is not None  # j3 runs

    assert table.count_by_state() == {
        "queued": 0,
        "running": 1,
        "done": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert table.stored_bytes() == 100 + 200 + 300 + 400 + 7
    # Oldest finished first; running and queued jobs never expire.
    assert table.finished_before(T0) == []
    assert table.finished_before(T0 + 1) == ["j0"]
    assert table.finished_before(clock.now + 1) == ["j0", "j1", "j2"]
    assert table.delete("j0")
    assert not table.delete("j0")
    assert table.get("j0") is None
    assert table.stored_bytes() == 200 + 300 + 400
    assert table.count_by_state()["done"] == 0


def test_every_record_field_has_its_column(url: str, table: JobTable) -> None:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            names = [c[0] for c in conn.execute(f"SELECT * FROM {TABLE}").description]
    else:
        with psycopg.connect(url) as conn:
            names = [c.name for c in conn.execute(f"SELECT * FROM {TABLE}").description or []]
    assert tuple(names) == COLUMNS


# The table as version 1 of the schema made it, before attempt_started_at and reserved_bytes.
SCHEMA_V1 = (
    f"""CREATE TABLE {TABLE} (
        id TEXT PRIMARY KEY, owner TEXT,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        params TEXT NOT NULL, input_name TEXT NOT NULL, input_bytes BIGINT NOT NULL,
        input_type TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL, tiles_total BIGINT NOT NULL DEFAULT 0,
        tiles_done BIGINT NOT NULL DEFAULT 0, pages_total BIGINT NOT NULL DEFAULT 0,
        pages_done BIGINT NOT NULL DEFAULT 0, result_bytes BIGINT NOT NULL DEFAULT 0,
        result_type TEXT, result_name TEXT, error TEXT, worker TEXT,
        lease_until DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 0
    )""",
    f"CREATE TABLE {TABLE}_schema (version INTEGER NOT NULL)",
    f"INSERT INTO {TABLE}_schema VALUES (1)",
    f"""INSERT INTO {TABLE} (id, owner, state, params, input_name, input_bytes, input_type,
        created_at, started_at, updated_at, tiles_total, tiles_done, worker, lease_until,
        attempts)
        VALUES ('old', NULL, 'running', '{{"output": "mask"}}', 's.tif', 1000, 'image/tiff',
        {T0}, {T0 + 5}, {T0 + 9}, 40, 12, 'w1', {T0 + 60}, 1)""",
)


def test_a_table_of_the_previous_version_is_upgraded_in_place(url: str, clock: Clock) -> None:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite://")).parent.mkdir(parents=True, exist_ok=True)
    for statement in SCHEMA_V1:
        raw_sql(url, statement)
    for _ in range(2):  # upgraded once; opening it again changes nothing
        table = open_job_table(url, clock=clock)
        try:
            old = table.get("old")
            assert old is not None and (old.state, old.tiles_done, old.started_at) == (
                "running",
                12,
                T0 + 5,
            )
            assert (old.attempt_started_at, old.reserved_bytes) == (None, 0)
            assert table.reserved() == {}
        finally:
            table.close()
    table = open_job_table(url, clock=clock)
    try:
        table.create(job("new", created_at=T0 + 1, reserved_bytes=77))
        assert table.reserved() == {"new": 77}
        clock.advance(100)  # the old job's lease ran out: it is claimed with the new columns
        resumed = table.claim("w2", lease_s=60, max_attempts=3)
        assert resumed is not None and resumed.id == "old"
        assert (resumed.started_at, resumed.attempt_started_at) == (T0 + 5, clock.now)
    finally:
        table.close()
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            versions = conn.execute(f"SELECT version FROM {TABLE}_schema").fetchall()
    else:
        with psycopg.connect(url) as conn:
            versions = conn.execute(f"SELECT version FROM {TABLE}_schema").fetchall()
    assert [tuple(v) for v in versions] == [(SCHEMA_VERSION,)]


def test_schema_from_a_newer_service_is_refused(url: str, table: JobTable) -> None:
    table.close()
    raw_sql(url, f"UPDATE {TABLE}_schema SET version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        open_job_table(url)


def all_at_once(claimer: Callable[[str], None], n: int) -> None:
    """Run claimer("w0") ... claimer("w<n-1>") in n threads released together; re-raise what
    any of them raised."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(worker: str) -> None:
        start.wait()
        try:
            claimer(worker)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_claimers_in_threads_get_each_job_once(table: JobTable) -> None:
    jobs = [f"j{i:02}" for i in range(40)]
    for i, job_id in enumerate(jobs):
        table.create(job(job_id, created_at=T0 + i))
    claimed: list[tuple[str, str]] = []

    def claimer(worker: str) -> None:
        while (got := table.claim(worker, lease_s=600, max_attempts=3)) is not None:
            claimed.append((got.id, worker))

    all_at_once(claimer, 8)
    assert sorted(job_id for job_id, _ in claimed) == jobs
    # Each job's record names the worker that got it.
    for job_id, worker in claimed:
        record = table.get(job_id)
        assert record is not None and record.worker == worker and record.attempts == 1


def test_one_job_many_claimers_one_winner(table: JobTable) -> None:
    table.create(job("only"))
    results: list[JobRecord | None] = []

    def claimer(worker: str) -> None:
        results.append(table.claim(worker, lease_s=600, max_attempts=3))

    all_at_once(claimer, 6)
    winners = [r for r in results if r is not None]
    assert len(results) == 6 and len(winners) == 1 and winners[0].id == "only"


CLAIMER = """
import sys
from unet_service.jobs.table.connect import open_job_table
table = open_job_table(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # the go signal: every process is connected before any claims
while (got := table.claim(sys.argv[2], lease_s=600, max_attempts=3)) is not None:
    print(got.id, flush=True)
table.close()
"""


def test_concurrent_claimers_in_processes_get_each_job_once(url: str, table: JobTable) -> None:
    jobs = [f"j{i:02}" for i in range(60)]
    for i, job_id in enumerate(jobs):
        table.create(job(job_id, created_at=T0 + i))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, url, f"proc{i}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate()[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    counts = Counter(job_id for out in outputs for job_id in out)
    assert sorted(counts) == jobs and set(counts.values()) == {1}
    for i, out in enumerate(outputs):
        for job_id in out:
            record = table.get(job_id)
            assert record is not None and record.worker == f"proc{i}"


def test_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must start with sqlite:/// or postgresql://"):
        open_job_table("mysql://localhost/jobs")
    with pytest.raises(ValueError, match="absolute path"):
        open_job_table("sqlite://relative.sqlite3")
    # An unreachable server is reported at once, with the reason and without the password.
    with pytest.raises(RuntimeError, match=r"unet:\*\*\*@127\.0\.0\.1:1/jobs") as e:
        open_job_table("postgresql://unet:secret@127.0.0.1:1/jobs")
    assert "secret" not in str(e.value)
    assert redact("postgres://u:p%40ss@h:5432/db") == "postgres://u:***@h:5432/db"
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_settings_name_the_table_and_limits(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, jobs_dir=tmp_path / "jobs")
    assert settings.jobs_db_url == f"sqlite:///{tmp_path}/jobs/jobs.sqlite3"
    table = open_job_table(settings.jobs_db_url)
    table.close()
    assert (tmp_path / "jobs" / "jobs.sqlite3").is_file()
    assert settings.jobs_quota_bytes == 50 * 2**30 and settings.jobs_ttl_s == 24 * 3600
    assert settings.max_job_upload_bytes == 20000 * 2**20
    given = "postgresql://unet:secret@db:5432/jobs"
    assert Settings(_env_file=None, jobs_db=given).jobs_db_url == given
    assert "secret" not in repr(Settings(_env_file=None, jobs_db=given))
    with pytest.raises(
        ValidationError, match=r"postgresql://user:password@host:port/db, not mysql"
    ):
        Settings(_env_file=None, jobs_db="mysql://unet:secret@db/jobs")
    with pytest.raises(ValidationError, match="greater than 0"):
        Settings(_env_file=None, jobs_quota_gb=0)


def test_expire_after_a_crash_lets_the_job_be_claimed_at_once_counting_the_attempt(
    table: JobTable, clock: Clock
) -> None:
    table.create(job("j0"))
    table.create(job("j1", created_at=T0 + 1))
    assert table.claim("w1", lease_s=600, max_attempts=2) is not None
    assert table.claim("w2", lease_s=600, max_attempts=2) is not None
    # w1 restarts (same name) long before its lease would run out.
    assert table.expire("w1") == 1
    again = table.claim("w1", lease_s=600, max_attempts=2)
    assert again is not None and again.id == "j0" and again.attempts == 2
    # It crashes again: the job has had its attempts and fails with the reason.
    assert table.expire("w1") == 1
    assert table.claim("w1", lease_s=600, max_attempts=2) is None
    failed = table.get("j0")
    assert failed is not None and failed.state == "failed"
    assert failed.error is not None and "interrupted 2 times" in failed.error
    other = table.get("j1")
    assert other is not None and other.state == "running" and other.worker == "w2"
