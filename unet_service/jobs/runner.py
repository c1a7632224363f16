"""The replica's section-job worker: claims queued jobs from the job table, one at a time,
and computes them through the same tile queue as the requests (as background images, see
serving.batcher), writing the result file beside the job's input.

A job survives anything short of its files being lost: the table says who works on it and
until when (a lease, renewed with every progress report). A replica that dies leaves its
lease to expire and any replica resumes the job from its first tile; the same replica
coming back under the same name (UNET_REPLICA_ID, the host name by default) takes its own
jobs back at once. A job interrupted too often is failed with the reason instead of
crashing replicas forever. Cancellation and deletion reach a running job through its next
progress report, within UNET_JOB_PROGRESS_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from unet_service.errors import InferenceError, UnreadableImageError
from unet_service.imaging.errors import ImageError
from unet_service.jobs.compute import JobLost, compute_job
from unet_service.jobs.files import JobFiles
from unet_service.jobs.table.records import JobRecord, JobTable
from unet_service.pipeline.to_file import Progress
from unet_service.serving.events import wait_event
from unet_service.serving.metrics import Metrics
from unet_service.serving.service import InferenceService
from unet_service.settings import Settings

log = logging.getLogger("app.jobs")

# How often a replica looks for work that another replica queued (its own submissions wake
# it at once), and for jobs past their time to live.
POLL_S = 2.0
SWEEP_S = 60.0
LEASE_FACTOR = 10  # lease = this many progress intervals: a few missed reports are no loss
# A job folder the table does not know (its upload was cut off by a crash, or its row was
# deleted while a result was written) is removed once untouched for this long; an upload in
# progress touches its file all the time.
ORPHAN_AGE_S = 3600


class JobRunner:
    def __init__(
        self,
        service: InferenceService,
        table: JobTable,
        files: JobFiles,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.service = service
        self.table = table
        self.files = files
        self.settings = settings
        self.metrics = metrics
        self.worker = settings.worker_name()
        self.lease_s = settings.job_progress_s * LEASE_FACTOR
        self._wakeup = asyncio.Event()
        # Held by a submission while it checks the room for its result and records the job
        # (routes/jobs.py), so that two submissions here never both take the last room.
        self.admission = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_sweep = 0.0

    async def start(self) -> None:
        # Jobs this replica held when it last stopped without handing them back (killed,
        # out of memory, power cut) are ours to resume now, not after their lease.
        resumed = await asyncio.to_thread(self.table.expire, self.worker)
        if resumed:
            log.warning("resuming %d job(s) interrupted when this replica last stopped", resumed)
        await self.refresh_metrics()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="unet-jobs")

    async def stop(self) -> None:
        """Stop working; a job in progress goes back to the queue for the next start or
        another replica (its tiles leave the tile queue first)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        released = await asyncio.to_thread(self.table.release, self.worker)
        if released:
            log.info("handed %d unfinished job(s) back to the queue", released)

    def wake(self) -> None:
        """A job was queued here: look now instead of at the next poll."""
        self._wakeup.set()

    async def refresh_metrics(self) -> None:
        counts = await asyncio.to_thread(self.table.count_by_state)
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    # ----- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._sweep_if_due()
                if not self.service.ready:  # draining: take no new work
                    await asyncio.sleep(POLL_S)
                    continue
                record = await asyncio.to_thread(
                    self.table.claim, self.worker, self.lease_s, self.settings.job_max_attempts
                )
                await self.refresh_metrics()
                if record is None:
                    self._wakeup.clear()
                    await wait_event(self._wakeup, POLL_S)
                    continue
                await self._execute(record)
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The table itself failed (database down, say): keep the replica serving
                # requests and try again shortly.
                log.exception("the job worker hit an error; retrying in %.0f s", POLL_S)
                await asyncio.sleep(POLL_S)

    async def _execute(self, record: JobRecord) -> None:
        log.info("job %s: started (attempt %d)", record.id, record.attempts)
        started = time.monotonic()
        progress = Progress(pages_total=record.pages_total, tiles_total=record.tiles_total)

        async def report() -> None:
            still_ours = await asyncio.to_thread(
                self.table.progress,
                record.id,
                self.worker,
                tiles_done=progress.tiles_done,
                tiles_total=progress.tiles_total,
                pages_done=progress.pages_done,
                pages_total=progress.pages_total,
                lease_s=self.lease_s,
                tiles_resumed=progress.resumed_tiles,
            )
            if not still_ours:
                raise JobLost(record.id)

        state, error, reason = "failed", None, None
        result = None
        try:
            result = await compute_job(
                record,
                service=self.service,
                files=self.files,
                settings=self.settings,
                progress=progress,
                report=report,
            )
            await report()  # the final counts
            state = "done"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, JobLost) or not await self._still_ours(record.id):
                # Cancelled, deleted or taken over while it ran: whatever that did to its
                # files (a deletion removes them under it) is no failure.
                await self._lost(record.id)
                return
            reason, error = _failure(record.id, e)
        elapsed = time.monotonic() - started
        finished = await asyncio.to_thread(
            self.table.finish,
            record.id,
            self.worker,
            state,
            error=error,
            result_bytes=result.bytes if result else 0,
            result_type=result.media_type if result else None,
            result_name=result.name if result else None,
        )
        if not finished:  # cancelled or deleted in the last moments: nobody wants the file
            await self._lost(record.id)
            return
        self.metrics.job_duration.labels(state).observe(elapsed)
        if reason is not None:
            self.metrics.job_failures.labels(reason).inc()
        log.info("job %s: %s after %.1f s%s", record.id, state, elapsed, f": {error}" * bool(error))

    async def _still_ours(self, job_id: str) -> bool:
        record = await asyncio.to_thread(self.table.get, job_id)
        return record is not None and record.state == "running" and record.worker == self.worker

    async def _lost(self, job_id: str) -> None:
        """The job stopped being this replica's while it ran. A deleted one's folder goes
        (writing its result may have made it again); one taken over keeps its files."""
        log.info("job %s: cancelled, deleted or taken over while running; stopped", job_id)
        if await asyncio.to_thread(self.table.get, job_id) is None:
            await asyncio.to_thread(self.files.remove, job_id)

    async def _sweep_if_due(self) -> None:
        now = time.time()
        if now - self._last_sweep < SWEEP_S:
            return
        self._last_sweep = now
        expired = await asyncio.to_thread(
            self.table.finished_before, now - self.settings.jobs_ttl_s
        )
        for job_id in expired:
            await asyncio.to_thread(self.files.remove, job_id)
            await asyncio.to_thread(self.table.delete, job_id)
        if expired:
            log.info("deleted %d job(s) past UNET_JOBS_TTL_H", len(expired))
        orphans = await asyncio.to_thread(self._orphans, now)
        for job_id in orphans:
            await asyncio.to_thread(self.files.remove, job_id)
        if orphans:
            log.info("removed %d job folder(s) that no job owns", len(orphans))

    def _orphans(self, now: float) -> list[str]:
        found = []
        for job_id in self.files.job_ids():
            folder = self.files.job_dir(job_id)
            try:
                touched = max(p.stat().st_mtime for p in [folder, *folder.iterdir()])
            except (FileNotFoundError, ValueError):
                continue
            if now - touched > ORPHAN_AGE_S and self.table.get(job_id) is None:
                found.append(job_id)
        return found


def _failure(job_id: str, error: Exception) -> tuple[str, str]:
    """(metric reason, the job's error message) of a job that failed while still ours."""
    if isinstance(error, ImageError | UnreadableImageError):
        return "input", str(error)  # the upload's fault: its message says what is wrong
    if isinstance(error, InferenceError):
        return "inference", str(error)  # a batch's failure, logged by the batcher
    log.error("job %s failed", job_id, exc_info=error)
    return "error", f"inference failed ({type(error).__name__}); see the server log"
