"""Section jobs that end early say only what is true: deleting a running job is an INFO line,
not an ERROR with a traceback, whatever the moment (while its tiles are computed, or just
as its result is being put in place); a job whose input turns out corrupt while its tiles
are cut fails with the reason, counted as the upload's fault (unet_job_failures_total
{reason="input"}), not as a worker error."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import em_crop, metric, save_tiny, service_of, stepped, tiff_bytes
from app_helpers import running as running_app
from test_jobs_api import jobs_app, submit, until, wait_state

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("failures"))


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records at WARNING or above, or carrying a traceback."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info
    ]


@pytest.mark.parametrize("output", ["mask", "overlay"])
async def test_deleting_a_job_as_its_result_is_finished_is_quiet(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, output: str
) -> None:
    """Deleted while its last forward pass runs: the job's result is complete before the
    worker's next progress report could notice, and its folder is gone under it."""
    caplog.set_level(logging.INFO)
    # No progress report while the test runs: the worker finds out only at the end.
    app = jobs_app(weights, tmp_path, job_progress_s=60)
    async with running_app(app) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        with stepped(service) as stepper:
            job = await submit(client, tiff_bytes(em_crop(0, 0, 0, 50, 50)), output=output)
            job_id = job.json()["id"]
            await until(stepper.entered.is_set, "the job's only forward pass")
            assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 200
            stepper.open()
            # Jobs run one after another: once the next is done, the deleted one has ended.
            nxt = (await submit(client, tiff_bytes(em_crop(1, 0, 0, 50, 50)))).json()
            assert (await wait_state(client, nxt["id"]))["state"] == "done"
        assert not (tmp_path / "jobs" / job_id).exists()
        assert await metric(client, "unet_job_failures_total", reason="error") == 0
    assert loud(caplog) == []
    assert any(f"job {job_id}: cancelled" in r.getMessage() for r in caplog.records)


async def test_deleting_a_job_while_its_tiles_are_computed_is_quiet(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    big = np.tile(em_crop(0, 0, 0, 256, 256), (2, 2))
    async with running_app(jobs_app(weights, tmp_path)) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        with stepped(service) as stepper:
            job = (await submit(client, tiff_bytes(big))).json()
            await stepper.allow(2)
            await wait_state(client, job["id"], ("running",))
            assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 200
            stepper.open()
            nxt = (await submit(client, tiff_bytes(em_crop(1, 0, 0, 50, 50)))).json()
            assert (await wait_state(client, nxt["id"]))["state"] == "done"
        assert not (tmp_path / "jobs" / job["id"]).exists()
    assert loud(caplog) == []


def with_a_corrupt_tile(pixels: np.ndarray) -> bytes:
    """A tiled, deflated TIFF whose headers are sound but whose second tile's compressed
    bytes are garbage: found only when that tile is read."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, tile=(64, 64), compression="zlib")
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        offset = tif.pages[0].dataoffsets[1]
        count = tif.pages[0].databytecounts[1]
    data[offset : offset + count] = (b"\xff\x00\x13" * count)[:count]
    return bytes(data)


@pytest.mark.parametrize("output", ["mask", "overlay"])
async def test_a_corrupt_input_fails_its_job_as_the_uploads_fault(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, output: str
) -> None:
    caplog.set_level(logging.INFO)
    data = with_a_corrupt_tile(em_crop(2, 0, 0, 128, 192))
    async with running_app(jobs_app(weights, tmp_path)) as client:
        r = await submit(client, data, output=output)
        assert r.status_code == 202, r.text  # its headers are sound
        failed = await wait_state(client, r.json()["id"])
        assert failed["state"] == "failed"
        assert "corrupt" in failed["error"] and "Traceback" not in failed["error"]
        assert await metric(client, "unet_worker_errors_total") == 0
        assert await metric(client, "unet_job_failures_total", reason="input") == 1
        assert await metric(client, "unet_job_failures_total", reason="inference") == 0
        # The worker goes on.
        nxt = (await submit(client, tiff_bytes(em_crop(1, 0, 0, 50, 50)))).json()
        assert (await wait_state(client, nxt["id"]))["state"] == "done"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
