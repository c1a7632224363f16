"""The job storage keeps room for results not written yet: a job reserves its result's size
(pipeline.outputs.result_nbytes) when it is accepted, the reservations of unfinished jobs count
against UNET_JOBS_QUOTA_GB and against the disk's free space, and the 507 says what would
not fit. A finished job holds only its files."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import em_crop, save_tiny, service_of, stepped, tiff_bytes
from app_helpers import running as running_app
from test_jobs_api import jobs_app, submit, wait_state

from unet_service.jobs.files import DiskUsage
from unet_service.jobs.storage_errors import size_text
from unet_service.pipeline.outputs import result_nbytes

pytestmark = pytest.mark.anyio
SIDE = 300


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("quota"))


def reservation(output: str) -> int:
    """What a job on one SIDE x SIDE page reserves (the tiny model has one class)."""
    return result_nbytes(SIDE * SIDE, 1, output, 1)


def folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir())


async def test_a_job_reserves_room_for_its_result_until_it_is_written(
    weights: Path, tmp_path: Path
) -> None:
    data = tiff_bytes(em_crop(0, 0, 0, SIDE, SIDE))
    upload, mask = len(data), reservation("mask")
    assert reservation("probabilities") > 4 * SIDE * SIDE  # float32, one class
    quota = 2 * upload + mask * 3 // 2
    # The table elsewhere, so that the quota counts the jobs' files alone.
    table = f"sqlite:///{tmp_path}/table/jobs.sqlite3"
    app = jobs_app(weights, tmp_path, jobs_quota_gb=quota / 2**30, jobs_db=table)
    async with running_app(app) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        # The upload alone fits, with its probabilities it would not: refused before the 202.
        r = await submit(client, data, output="probabilities")
        assert r.status_code == 507, r.text
        assert r.json()["error"].startswith(
            f"this upload ({size_text(upload)}) and its result "
            f"({size_text(reservation('probabilities'))}) would not fit in the job storage "
            f"(UNET_JOBS_QUOTA_GB): 0 bytes of {size_text(quota)} used"
        )
        assert folders(tmp_path) == []
        with stepped(service) as stepper:
            first = await submit(client, data)
            assert first.status_code == 202, first.text
            # While the first job's result is to come, its room is taken.
            second = await submit(client, data)
            assert second.status_code == 507, second.text
            assert second.json()["error"].startswith(
                f"this upload ({size_text(upload)}) and its result ({size_text(mask)}) would "
                f"not fit in the job storage (UNET_JOBS_QUOTA_GB): {size_text(upload + mask)} "
                f"of {size_text(quota)} used"
            )
            assert folders(tmp_path) == [first.json()["id"]]
            stepper.open()
            done = await wait_state(client, first.json()["id"])
        assert done["state"] == "done"
        assert done["result"]["bytes"] < mask // 2  # a mask compresses well
        # Written, the result holds only its file: the same upload fits now.
        third = await submit(client, data)
        assert third.status_code == 202, third.text


async def test_the_disk_must_have_room_for_the_results_to_come(
    weights: Path, tmp_path: Path
) -> None:
    data = tiff_bytes(em_crop(1, 0, 0, SIDE, SIDE))
    mask = reservation("mask")
    async with running_app(jobs_app(weights, tmp_path)) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        files = app.state.jobs.files
        with stepped(service_of(app)):
            first = await submit(client, data)
            assert first.status_code == 202, first.text

            def disk(free: int):
                return lambda root: DiskUsage(total=10 * 2**30, used=10 * 2**30 - free, free=free)

            # Room for one result, but the first job's is still to be written.
            files.disk_usage = disk(mask + mask // 2)
            r = await submit(client, data)
            assert r.status_code == 507, r.text
            assert "would not fit on the disk of the jobs folder" in r.json()["error"]
            assert f"and its result ({size_text(mask)})" in r.json()["error"]
            assert folders(tmp_path) == [first.json()["id"]]
            files.disk_usage = disk(2 * mask)
            r = await submit(client, data)
            assert r.status_code == 202, r.text
