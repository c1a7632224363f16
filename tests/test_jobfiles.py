"""The job API's files on disk (jobs/files.py): uploads streamed to disk under a size limit
and a quota, nothing left behind by a refused or broken upload, results renamed into place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from unet_service.api.errors import answer_for, install_error_handlers
from unet_service.errors import ServiceError
from unet_service.jobs.files import WRITE_PIECE, DiskUsage, JobFiles
from unet_service.jobs.storage_errors import JobStorageFull, UploadTooLarge

pytestmark = pytest.mark.anyio
MiB = 1 << 20
CHUNK = 64 * 1024  # what an ASGI server typically hands over at a time


def piece(i: int, size: int = CHUNK) -> bytes:
    return bytes([i % 251]) * size


async def chunks(n: int, size: int = CHUNK) -> AsyncIterator[bytes]:
    for i in range(n):
        yield piece(i, size)


def expected(n: int, size: int = CHUNK) -> bytes:
    return b"".join(piece(i, size) for i in range(n))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_an_upload_goes_to_disk_as_it_arrives(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs", quota_bytes=100 * MiB)
    n = 20 * MiB // CHUNK
    behind: list[int] = []

    async def watched() -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks(n):
            # What has arrived so far is on disk, but for the piece being gathered.
            behind.append(sent - files.used_bytes())
            sent += len(chunk)
            yield chunk

    size = await files.receive("job1", watched(), max_bytes=50 * MiB)
    assert size == n * CHUNK
    assert files.input_path("job1").read_bytes() == expected(n)
    assert files_under(files.root) == ["job1", "job1/input"]
    assert files.used_bytes() == size and files.free_bytes() == 80 * MiB
    assert max(behind) < WRITE_PIECE + CHUNK
    assert files.job_ids() == ["job1"]


async def test_too_large_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=100 * MiB)
    with pytest.raises(UploadTooLarge) as e:
        await files.receive("big", chunks(5 * MiB // CHUNK), max_bytes=3 * MiB)
    assert answer_for(e.value)[0] == 413 and e.value.limit_bytes == 3 * MiB
    assert e.value.message == (
        "the upload is larger than the limit of 3 MiB for a job (UNET_MAX_JOB_UPLOAD_MB)"
    )
    assert files_under(tmp_path) == []

    # Declared too large: refused before a byte is read.
    read = []

    async def never() -> AsyncIterator[bytes]:
        read.append(True)
        yield b"x"

    with pytest.raises(UploadTooLarge):
        await files.receive("big", never(), max_bytes=3 * MiB, expected_bytes=3 * MiB + 1)
    assert read == [] and files_under(tmp_path) == []


async def test_a_full_store_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=3 * MiB)
    await files.receive("first", chunks(2 * MiB // CHUNK), max_bytes=10 * MiB)
    with pytest.raises(JobStorageFull) as e:
        await files.receive("second", chunks(2 * MiB // CHUNK), max_bytes=10 * MiB)
    assert answer_for(e.value)[0] == 507
    assert (e.value.used_bytes, e.value.limit_bytes) == (2 * MiB, 3 * MiB)
    assert e.value.message == (
        "this upload (1.1 MiB so far) would not fit in the job storage (UNET_JOBS_QUOTA_GB): "
        "2.0 MiB of 3.0 MiB used, with the results of unfinished jobs; delete finished jobs "
        "or wait for them to expire"
    )
    assert files_under(tmp_path) == ["first", "first/input"]
    # Declared: refused at once.
    with pytest.raises(JobStorageFull):
        await files.receive("second", chunks(1), max_bytes=10 * MiB, expected_bytes=2 * MiB)
    assert files_under(tmp_path) == ["first", "first/input"]
    # Exactly up to the quota fits.
    await files.receive("second", chunks(MiB // CHUNK), max_bytes=10 * MiB)
    assert files.used_bytes() == files.quota_bytes and files.free_bytes() == 0


async def test_results_not_written_yet_hold_their_room(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=10 * MiB)
    await files.receive("a", chunks(2 * MiB // CHUNK), max_bytes=10 * MiB)
    # a's job reserved 3 MiB for its result: counted whole before a byte of it is written,
    # then what is still to come, and once the result passes its reservation, the file.
    assert files.used_bytes({"a": 3 * MiB}) == 5 * MiB
    part = files.result_part("a")
    part.write_bytes(bytes(MiB))
    assert files.used_bytes({"a": 3 * MiB}) == 5 * MiB
    part.write_bytes(bytes(MiB // 2))  # a result smaller than reserved, so far
    assert files.used_bytes({"a": 3 * MiB}) == 5 * MiB
    part.write_bytes(bytes(4 * MiB))
    assert files.used_bytes({"a": 3 * MiB}) == 6 * MiB
    part.unlink()
    # An upload counts the reservations: 2 MiB on disk + 3 reserved + 6 arriving > 10.
    with pytest.raises(JobStorageFull, match=r"this upload \(5\.\d MiB so far\)"):
        await files.receive(
            "b", chunks(6 * MiB // CHUNK), max_bytes=10 * MiB, reserved={"a": 3 * MiB}
        )
    await files.receive("b", chunks(2 * MiB // CHUNK), max_bytes=10 * MiB, reserved={"a": 3 * MiB})
    # b's result must fit too: 2 + 2 + 3 reserved + 4 > 10.
    with pytest.raises(JobStorageFull) as e:
        files.check_room(2 * MiB, 4 * MiB, {"a": 3 * MiB})
    assert e.value.message == (
        "this upload (2.0 MiB) and its result (4.0 MiB) would not fit in the job storage "
        "(UNET_JOBS_QUOTA_GB): 5.0 MiB of 10.0 MiB used, with the results of unfinished jobs; "
        "delete finished jobs or wait for them to expire"
    )
    files.check_room(2 * MiB, 3 * MiB, {"a": 3 * MiB})  # exactly up to the quota fits
    files.check_room(2 * MiB, 4 * MiB, {})  # a's result written (or a gone): room again


async def test_the_disk_must_hold_the_results_to_come(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=100 * MiB)
    await files.receive("a", chunks(MiB // CHUNK), max_bytes=10 * MiB)
    # A disk with 5 MiB free, where a's result will still take 3 MiB.
    files.disk_usage = lambda root: DiskUsage(total=50 * MiB, used=45 * MiB, free=5 * MiB)
    reserved = {"a": 3 * MiB}
    files.check_room(MiB, 2 * MiB, reserved)
    with pytest.raises(JobStorageFull) as e:
        files.check_room(MiB, 2 * MiB + 1, reserved)
    assert e.value.message.startswith(
        "this upload (1.0 MiB) and its result (2.0 MiB) would not fit on the disk of the jobs "
        "folder: 47.0 MiB of 50.0 MiB used"
    )
    # A declared upload that would eat into the reserved room is refused before it is read.
    read = []

    async def never() -> AsyncIterator[bytes]:
        read.append(True)
        yield b"x"

    with pytest.raises(JobStorageFull, match="on the disk"):
        await files.receive(
            "b", never(), max_bytes=10 * MiB, expected_bytes=2 * MiB + 1, reserved=reserved
        )
    assert read == [] and files.job_ids() == ["a"]


async def test_room_freed_during_an_upload_is_used(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=3 * MiB)
    await files.receive("old", chunks(2 * MiB // CHUNK), max_bytes=10 * MiB)

    async def deleting_meanwhile() -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks(2 * MiB // CHUNK):
            if sent == MiB // 2:
                # Half-way, before the upload reaches the quota as last counted: a finished
                # job expires (on this replica or another).
                files.remove("old")
            sent += len(chunk)
            yield chunk

    assert await files.receive("new", deleting_meanwhile(), max_bytes=10 * MiB) == 2 * MiB
    assert files.job_ids() == ["new"]


async def test_a_broken_or_abandoned_upload_leaves_nothing(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=100 * MiB)

    async def broken() -> AsyncIterator[bytes]:
        async for chunk in chunks(3 * MiB // CHUNK):
            yield chunk
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await files.receive("a", broken(), max_bytes=10 * MiB)
    assert files_under(tmp_path) == []

    # Cancelled while waiting for the next chunk (the request's task ends).
    waiting, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        async for chunk in chunks(3 * MiB // CHUNK):
            yield chunk
        waiting.set()
        await never.wait()
        yield b"never"

    task = asyncio.create_task(files.receive("b", stalled(), max_bytes=10 * MiB))
    await waiting.wait()
    assert files.used_bytes() > 0  # it was on disk
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []


async def test_receive_keeps_the_other_files_of_the_job(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=100 * MiB)
    files.job_dir("j").mkdir()
    (files.job_dir("j") / "notes").write_text("kept")
    with pytest.raises(UploadTooLarge):
        await files.receive("j", chunks(4), max_bytes=CHUNK)
    assert files_under(tmp_path) == ["j", "j/notes"]


def test_results_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, quota_bytes=MiB)
    with pytest.raises(RuntimeError, match="page 3"), files.result_writer("j") as part:
        part.write_bytes(b"half a TIFF")
        raise RuntimeError("decoding page 3 failed")
    assert not files.result_path("j").exists() and files_under(tmp_path) == ["j"]

    with files.result_writer("j") as part:
        part.write_bytes(b"a whole TIFF")
        assert not files.result_path("j").exists()
    assert files.result_path("j").read_bytes() == b"a whole TIFF"
    assert files_under(tmp_path) == ["j", "j/result"]
    files.remove("j")
    files.remove("j")  # already gone: nothing to do
    assert files_under(tmp_path) == [] and files.used_bytes() == 0


def test_job_ids_cannot_escape_the_root(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs", quota_bytes=MiB)
    for bad in ("", "..", "../x", "a/b", ".hidden", "a b", "x" * 200, "jobs.sqlite3"):
        with pytest.raises(ValueError, match="not a job id"):
            files.job_dir(bad)
    assert files.job_dir("0f3a-b_9") == tmp_path / "jobs" / "0f3a-b_9"
    # Other things in the root (the SQLite job table) are counted but are not jobs.
    (files.root / "jobs.sqlite3").write_bytes(b"x" * 10)
    assert files.job_ids() == [] and files.used_bytes() == 10
    with pytest.raises(ValueError, match="positive"):
        JobFiles(tmp_path, quota_bytes=0)


async def test_errors_reach_the_client_as_json(tmp_path: Path) -> None:
    """Wired as the job routes do: the request body streamed straight to disk."""
    files = JobFiles(tmp_path, quota_bytes=5 * MiB)
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/upload/{job_id}")
    async def upload(job_id: str, request: Request) -> dict[str, int]:
        length = request.headers.get("content-length")
        declared = int(length) if length is not None else None
        size = await files.receive(
            job_id, request.stream(), max_bytes=2 * MiB, expected_bytes=declared
        )
        return {"bytes": size}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        big = await client.post("/upload/c", content=chunks(33))  # chunked: no length
        assert big.status_code == 413 and "limit of 2 MiB" in big.json()["error"]
        for job_id in ("a", "b"):
            ok = await client.post(f"/upload/{job_id}", content=expected(32))
            assert ok.status_code == 200 and ok.json() == {"bytes": 2 * MiB}
        full = await client.post("/upload/c", content=expected(24))
        assert full.status_code == 507
        assert full.json() == {"error": JobStorageFull(24 * CHUNK, 4 * MiB, 5 * MiB).message}
    assert files.job_ids() == ["a", "b"]
    # The app's own error handler renders them: they are the service's errors, which
    # api.errors answers (no HTTP in the job files).
    assert issubclass(JobStorageFull, ServiceError) and issubclass(UploadTooLarge, ServiceError)
