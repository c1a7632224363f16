"""A job as the table holds it (`JobRecord`), its states, and the interface every table
implements (`JobTable`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATES: tuple[JobState, ...] = ("done", "failed", "cancelled")

Clock = Callable[[], float]


@dataclass
class JobRecord:
    """One job as the table holds it. Times are unix seconds."""

    id: str
    # An opaque id derived from the API key (never the key itself); None when auth is off.
    owner: str | None
    state: JobState
    # The request's options as JSON (output, tta, colour, threshold...).
    params: dict[str, Any]
    input_name: str
    input_bytes: int
    input_type: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    tiles_total: int = 0
    tiles_done: int = 0
    pages_total: int = 0
    pages_done: int = 0
    result_bytes: int = 0
    result_type: str | None = None
    result_name: str | None = None
    error: str | None = None
    worker: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    # When the running attempt began (started_at is the first attempt's start).
    attempt_started_at: float | None = None
    # Result bytes held in the jobs folder's quota while the job is queued or running.
    reserved_bytes: int = 0
    # Of tiles_done, those the running attempt found done by an earlier one (an OME-Zarr
    # result's written blocks): the ETA counts the rate of the rest.
    tiles_resumed: int = 0


class JobExists(ValueError):
    """`create` with an id that is already in the table."""


class JobTable(Protocol):
    def create(self, record: JobRecord) -> None:
        """Insert a new job; raises JobExists when its id is taken."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def list(
        self,
        owner: str | None,
        *,
        all_owners: bool = False,
        limit: int = 1000,
        states: Sequence[JobState] = (),
        before: tuple[float, str] | None = None,
    ) -> list[JobRecord]:
        """This owner's jobs (owner None: the jobs without an owner), or everyone's with
        all_owners, newest first (by created_at, then id): at most `limit`, only those in
        `states` when given, only those after `before` = (created_at, id) in that order
        (the next page after a page's last job)."""

    def claim(self, worker: str, lease_s: float, max_attempts: int) -> JobRecord | None:
        """Take the oldest queued job, or running one whose lease has expired, for this
        worker; exactly one of several concurrent claimers gets a given job. A job already
        tried max_attempts times is failed with the reason instead, and the next is tried."""

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
        """Record progress (`tiles_resumed` of the tiles done were found done by an earlier
        attempt) and renew the lease; False when the job is no longer running for
        this worker (cancelled, deleted, or claimed by another after the lease ran out)."""

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
        """End a job this worker is running; False (nothing changed) otherwise."""

    def cancel(self, job_id: str) -> JobRecord | None:
        """Queued or running -> cancelled; a finished job stays as it is. The job as it now
        is, or None when there is no such job."""

    def delete(self, job_id: str) -> bool: ...

    def release(self, worker: str) -> int:
        """A clean stop: this worker's running jobs go back to the queue, and the attempt
        does not count. Returns how many."""

    def expire(self, worker: str) -> int:
        """A restart after a crash: the leases of this worker's running jobs end now, so
        that `claim` takes them again at once, counting the interrupted attempt (a job
        that crashes its replica every time then fails after max_attempts). Returns how
        many."""

    def finished_before(self, t: float) -> list[str]:
        """Ids of done, failed and cancelled jobs that finished before t (for the TTL)."""

    def count_by_state(self) -> dict[str, int]:
        """Jobs per state, every state present."""

    def stored_bytes(self) -> int:
        """Input plus result bytes of every job in the table."""

    def reserved(self) -> dict[str, int]:
        """Job id -> reserved_bytes of the queued and running jobs that reserve any: their
        results, not written yet, that the quota keeps room for."""

    def close(self) -> None: ...
