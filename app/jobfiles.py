"""The job API's files on disk: one folder per job under UNET_JOBS_DIR holding its `input` and
its `result`, under a size quota for the whole folder.

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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from app.errors import ApiError

# Written to disk once this much has arrived: large enough that the thread hand-off per write
# costs little, small enough that memory stays flat.
WRITE_PIECE = 1 << 20
# The quota is checked against a fresh count of the folder at least this often during an
# upload, so uploads to other jobs (on this replica or another sharing the volume) are seen.
RECOUNT_EVERY = 64 << 20
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class UploadTooLarge(ApiError):
    """413: the upload is over the per-job size limit."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            413,
            f"the upload is larger than the limit of {limit_bytes / 2**20:g} MiB for a job "
            "(UNET_MAX_JOB_UPLOAD_MB)",
        )
        self.limit_bytes = limit_bytes


class JobStorageFull(ApiError):
    """507: the jobs folder's quota has no room for this upload."""

    def __init__(self, used_bytes: int, quota_bytes: int) -> None:
        super().__init__(
            507,
            f"job storage is full: {used_bytes} of {quota_bytes} bytes used; delete finished "
            "jobs or wait for them to expire",
        )
        self.used_bytes = used_bytes
        self.quota_bytes = quota_bytes


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

    def job_ids(self) -> list[str]:
        """The jobs that have a folder (for finding folders the job table no longer knows)."""
        with os.scandir(self.root) as entries:
            return sorted(
                e.name
                for e in entries
                if e.is_dir(follow_symlinks=False) and JOB_ID.fullmatch(e.name)
            )

    def used_bytes(self) -> int:
        """Bytes in all files under the root, partial uploads and the SQLite job table
        included (it lives there by default)."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # removed while counting
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def free_bytes(self) -> int:
        """Room left under the quota (negative when over it)."""
        return self.quota_bytes - self.used_bytes()

    async def receive(
        self,
        job_id: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int,
        *,
        expected_bytes: int | None = None,
    ) -> int:
        """Stream an upload to the job's `input`; returns its size. `expected_bytes` (the
        declared Content-Length, when there is one) lets a too-large upload or a full store be
        refused before a byte is read. Raises UploadTooLarge (413) or JobStorageFull (507),
        and on any failure removes what it wrote."""
        final = self.input_path(job_id)
        part = final.with_name("input.part")
        counted = await asyncio.to_thread(self.used_bytes)
        if expected_bytes is not None:
            if expected_bytes > max_bytes:
                raise UploadTooLarge(max_bytes)
            if counted + expected_bytes > self.quota_bytes:
                raise JobStorageFull(counted, self.quota_bytes)
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
                    counted, since_count = await asyncio.to_thread(self.used_bytes), 0
                    if counted > self.quota_bytes:
                        raise JobStorageFull(counted - size, self.quota_bytes)
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

    def remove(self, job_id: str) -> None:
        """Delete the job's folder and everything in it (nothing to do if there is none)."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
