"""The job API's files on disk: one folder per job under UNET_JOBS_DIR holding its `input` and
its `result`, under a size quota for the whole folder. A job's result is written long after
its upload is accepted, so its room is kept from the start: the results that unfinished
jobs will write (their reservations, JobTable.reserved) count as used, under the quota and
against the disk's free space, until they are written.

Uploads are streamed to disk in pieces of about a MiB, written off the event loop, so a job's
input is never held in memory whatever its size. A refused or broken upload (over its size
limit, over the quota, a client gone mid-way) leaves nothing behind, so refused uploads cannot
fill the disk. Files are written under a temporary name and renamed into place once complete
and flushed to the disk, so a crash never leaves a truncated `input` or `result` that looks
whole."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

from unet_service.jobs.storage_errors import JobStorageFull, UploadTooLarge

# Written to disk once this much has arrived: large enough that the thread hand-off per write
# costs little, small enough that memory stays flat.
WRITE_PIECE = 1 << 20
# The quota is checked against a fresh count of the folder at least this often during an
# upload, so uploads to other jobs (on this replica or another sharing the volume) are seen.
RECOUNT_EVERY = 64 << 20
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class DiskUsage(NamedTuple):
    """As shutil.disk_usage answers: bytes."""

    total: int
    used: int
    free: int


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (0 when there is none)."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while counting
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(f: BinaryIO, pieces: list[bytes]) -> None:
    f.write(b"".join(pieces))
    # Out of Python's buffer, so that used_bytes() counts all of it.
    f.flush()


def _finish(f: BinaryIO, part: Path, final: Path) -> None:
    os.fsync(f.fileno())
    f.close()
    os.replace(part, final)
    # A rename is durable only once the folder holding it is flushed too.
    _fsync(final.parent)


class JobFiles:
    def __init__(self, root: Path, quota_bytes: int) -> None:
        if quota_bytes <= 0:
            raise ValueError(f"the jobs quota must be positive, not {quota_bytes}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        # The disk's size and free space (a test may put a smaller disk in its place).
        self.disk_usage: Callable[[Path], DiskUsage] = shutil.disk_usage
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        # Job ids name folders: nothing that could climb out of the root or hide a file.
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def input_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result"

    def store_path(self, job_id: str) -> Path:
        """Where an OME-Zarr result is written, block by block, when the job names no
        location for it: resumable, so never under a temporary name."""
        return self.job_dir(job_id) / "result.zarr"

    def job_ids(self) -> list[str]:
        """The jobs that have a folder (for finding folders the job table no longer knows)."""
        with os.scandir(self.root) as entries:
            return sorted(
                e.name
                for e in entries
                if e.is_dir(follow_symlinks=False) and JOB_ID.fullmatch(e.name)
            )

    def used_bytes(self, reserved: Mapping[str, int] | None = None) -> int:
        """Bytes in all files under the root, partial uploads and the SQLite job table
        included (it lives there by default), and what the results `reserved` (job id ->
        reserved bytes, JobTable.reserved) have yet to write."""
        return tree_bytes(self.root) + self.unwritten_bytes(reserved or {})

    def unwritten_bytes(self, reserved: Mapping[str, int]) -> int:
        """What the reserved results have yet to write: each reservation less what its
        result holds so far (a running job's result grows into its reservation)."""
        total = 0
        for job_id, nbytes in reserved.items():
            written = tree_bytes(self.store_path(job_id))
            for name in ("result.part", "result"):
                with contextlib.suppress(FileNotFoundError):
                    written = max(written, os.stat(self.job_dir(job_id) / name).st_size)
            total += max(0, nbytes - written)
        return total

    def free_bytes(self) -> int:
        """Room left under the quota (negative when over it)."""
        return self.quota_bytes - self.used_bytes()

    def check_room(self, upload_bytes: int, result_bytes: int, reserved: Mapping[str, int]) -> None:
        """Whether a job whose upload (`upload_bytes`, on disk now) is received can start:
        its result must fit beside everything else, under the quota and on the disk, the
        results that the `reserved` jobs have yet to write counted as written. Raises
        JobStorageFull (507). Blocking (it counts the folder)."""
        others = self.used_bytes(reserved) - upload_bytes
        if others + upload_bytes + result_bytes > self.quota_bytes:
            raise JobStorageFull(upload_bytes, others, self.quota_bytes, result_bytes=result_bytes)
        disk = self.disk_usage(self.root)
        pending = self.unwritten_bytes(reserved)
        if result_bytes + pending > disk.free:
            others = disk.total - disk.free - upload_bytes + pending
            raise JobStorageFull(
                upload_bytes, others, disk.total, result_bytes=result_bytes, on_disk=True
            )

    def _check_disk(self, upload_bytes: int, reserved: Mapping[str, int], so_far: bool) -> None:
        """The upload's bytes still to come (all of `upload_bytes` when declared, none when
        counted so far) must leave the reserved results their room on the disk."""
        disk = self.disk_usage(self.root)
        pending = self.unwritten_bytes(reserved)
        coming = 0 if so_far else upload_bytes
        if coming + pending > disk.free:
            used = disk.total - disk.free + pending - (upload_bytes if so_far else 0)
            raise JobStorageFull(upload_bytes, used, disk.total, on_disk=True, so_far=so_far)

    async def receive(
        self,
        job_id: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        expected_bytes: int | None = None,
        reserved: Mapping[str, int] | None = None,
    ) -> int:
        """Stream an upload to the job's `input`; returns its size. `expected_bytes` (the
        declared Content-Length, when there is one) lets a too-large upload or a full store be
        refused before a byte is read; `reserved` (JobTable.reserved) are the results that
        unfinished jobs have yet to write, which count as written. Raises UploadTooLarge
        (413) or JobStorageFull (507), and on any failure removes what it wrote."""
        reserved = reserved or {}
        final = self.input_path(job_id)
        part = final.with_name("input.part")
        counted = await asyncio.to_thread(self.used_bytes, reserved)
        if expected_bytes is not None:
            if expected_bytes > max_bytes:
                raise UploadTooLarge(max_bytes)
            if counted + expected_bytes > self.quota_bytes:
                raise JobStorageFull(expected_bytes, counted, self.quota_bytes)
            await asyncio.to_thread(self._check_disk, expected_bytes, reserved, False)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Opened here, not in a thread: a cancellation can then never leave a file behind
        # that a thread created after the cleanup below.
        f = open(part, "wb")  # noqa: SIM115 - closed by _finish or the cleanup
        try:
            size, since_count, buffer, buffered = 0, 0, [], 0
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                buffer.append(chunk)
                buffered += len(chunk)
                since_count += len(chunk)
                over = counted + since_count > self.quota_bytes
                if buffered >= WRITE_PIECE or over or since_count >= RECOUNT_EVERY:
                    await asyncio.to_thread(_write, f, buffer)
                    buffer, buffered = [], 0
                if over or since_count >= RECOUNT_EVERY:
                    # Count again before refusing: other jobs may have been deleted meanwhile.
                    counted, since_count = await asyncio.to_thread(self.used_bytes, reserved), 0
                    if counted > self.quota_bytes:
                        raise JobStorageFull(size, counted - size, self.quota_bytes, so_far=True)
                    await asyncio.to_thread(self._check_disk, size, reserved, True)
            await asyncio.to_thread(_write, f, buffer)
            await asyncio.to_thread(_finish, f, part, final)
            return size
        except BaseException:
            # Also on cancellation (the client went away): nothing may stay behind. Plain
            # calls, not awaited threads: a second cancellation could interrupt an await here.
            f.close()
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            with contextlib.suppress(OSError):  # not empty: the job has other files
                final.parent.rmdir()
            raise

    @contextlib.contextmanager
    def result_writer(self, job_id: str) -> Iterator[Path]:
        """A temporary path to write the job's result to; renamed to `result_path(job_id)`
        once the block ends without an exception, removed if it raises. Blocking (it flushes
        the file to the disk): use it in the worker thread that writes the result."""
        part = self.result_part(job_id)
        try:
            yield part
            self.commit_result(job_id)
        except BaseException:
            self.discard_result(job_id)
            raise

    def result_part(self, job_id: str) -> Path:
        """Where the result is written while it is made (its folder created)."""
        final = self.result_path(job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name("result.part")

    def commit_result(self, job_id: str) -> None:
        """The written result.part becomes the result, flushed to the disk (blocking)."""
        final = self.result_path(job_id)
        part = final.with_name("result.part")
        _fsync(part)
        os.replace(part, final)
        _fsync(final.parent)

    def discard_result(self, job_id: str) -> None:
        """Remove a result being written (a failed, cancelled or interrupted job's)."""
        with contextlib.suppress(FileNotFoundError):
            self.result_path(job_id).with_name("result.part").unlink()

    def discard_store(self, job_id: str) -> None:
        """Remove a failed job's OME-Zarr result from its folder."""
        shutil.rmtree(self.store_path(job_id), ignore_errors=True)

    def remove(self, job_id: str) -> None:
        """Delete the job's folder and everything in it (nothing to do if there is none)."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
