"""The section-job API in process, with the tiny real UNet: create -> progress -> result ->
delete, stacks, cancellation, quota and limits, other keys' jobs, bad uploads; and the
batcher's priority for requests over jobs."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from app_helpers import (
    em_crop,
    make_app,
    metric,
    png_bytes,
    save_tiny,
    service_of,
    stepped,
    tiff_bytes,
)
from app_helpers import running as running_app
from PIL import Image

from conftest import read_volume
from unet_service.pipeline import to_file

pytestmark = pytest.mark.anyio

FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("jobs"))


def jobs_app(weights: Path, tmp_path: Path, **overrides: object):
    """Job pages in batches as large as a request's (8 tiles), so that a page computed by a
    job and the same page sent to /v1/segment go through the same batches: equal results
    on any CPU, not only within docs/inference.md's tolerances."""
    values: dict[str, object] = {
        "jobs_dir": tmp_path / "jobs",
        "job_progress_s": 0.02,
        "job_batch_tiles": 8,
    }
    return make_app(weights, **(values | overrides))


async def submit(client: httpx.AsyncClient, data: bytes, name: str = "x.tif", **params):
    return await client.post("/v1/jobs", params=params, files={"file": (name, data)})


async def wait_state(
    client: httpx.AsyncClient, job_id: str, states=FINAL, headers=None, timeout: float = 120
) -> dict:
    """Poll until the job reaches one of `states` (the worker runs on its own; this only
    waits for it, with a generous bound against a hang)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        body = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if body["state"] in states:
            return body
        if loop.time() > end:
            raise AssertionError(f"job {job_id} stuck in {body['state']}")
        await asyncio.sleep(0.01)


async def until(condition, what: str, timeout: float = 120) -> None:
    """Wait for `condition()` (sync or async) to hold; a bound against a hang only."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        held = condition()
        if asyncio.iscoroutine(held):
            held = await held
        if held:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def pages_of(data: bytes) -> list[np.ndarray]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return [page.asarray() for page in tif.pages]


async def sync_mask(client: httpx.AsyncClient, pixels: np.ndarray) -> np.ndarray:
    r = await client.post("/v1/segment", files={"file": ("p.png", png_bytes(pixels))})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


async def test_job_lifecycle_stack_result_equals_each_page_alone(
    weights: Path, tmp_path: Path
) -> None:
    pages = [em_crop(i, 10 * i, 20, 150, 170) for i in range(3)]
    async with running_app(jobs_app(weights, tmp_path)) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        with stepped(service) as stepper:
            r = await submit(client, tiff_bytes(*pages), name="stack.tif")
            assert r.status_code == 202, r.text
            job = r.json()
            assert r.headers["location"] == f"/v1/jobs/{job['id']}"
            assert job["state"] in ("queued", "running")
            assert job["progress"]["tiles_total"] == 3 * 9  # known from the start: 3x3 a page
            assert job["input"] | {"bytes": 0} == {
                "name": "stack.tif",
                "media_type": "image/tiff",
                "bytes": 0,
                "width": 170,
                "height": 150,
                "pages": 3,
            }
            early = await client.get(f"/v1/jobs/{job['id']}/result")
            assert early.status_code == 409 and "error" in early.json()
            # Progress moves as passes are allowed.
            await stepper.allow(2)
            await wait_state(client, job["id"], ("running",))

            async def progressed() -> bool:
                nonlocal moved
                moved = (await client.get(f"/v1/jobs/{job['id']}")).json()
                return moved["progress"]["tiles_done"] >= 2

            moved: dict = {}
            await until(progressed, "progress")
            assert 2 <= moved["progress"]["tiles_done"] < moved["progress"]["tiles_total"]
            assert moved["eta_s"] is not None and moved["eta_s"] > 0
            stepper.open()
            done = await wait_state(client, job["id"])
        assert done["state"] == "done", done
        assert done["progress"]["fraction"] == 1.0
        assert done["progress"]["pages_done"] == 3
        result = await client.get(done["result"]["url"])
        assert result.status_code == 200
        assert result.headers["content-type"] == "image/tiff"
        got = pages_of(result.content)
        assert len(got) == 3
        for page, mask in zip(pages, got, strict=True):
            assert np.array_equal(mask, await sync_mask(client, page))
        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert await metric(client, "unet_jobs", state="done") == 1
        assert await metric(client, "unet_job_duration_seconds_count", state="done") == 1
        gone = await client.delete(f"/v1/jobs/{job['id']}")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404
        assert not (tmp_path / "jobs" / job["id"]).exists()


async def test_instances_job_equals_the_synchronous_instances(
    weights: Path, tmp_path: Path
) -> None:
    pixels = em_crop(2, 0, 0, 200, 180)
    async with running_app(jobs_app(weights, tmp_path)) as client:
        r = await submit(client, png_bytes(pixels), name="s.png", output="instances")
        assert r.status_code == 202, r.text
        done = await wait_state(client, r.json()["id"])
        assert done["state"] == "done", done
        got = pages_of((await client.get(done["result"]["url"])).content)
        sync = await client.post(
            "/v1/segment", params={"output": "instances"}, files={"file": png_bytes(pixels)}
        )
        expected = np.asarray(Image.open(io.BytesIO(sync.content)))
        assert len(got) == 1 and got[0].max() > 1
        assert np.array_equal(got[0].astype(np.int64), expected.astype(np.int64))


async def test_cancel_a_running_job_empties_the_queue(weights: Path, tmp_path: Path) -> None:
    big = np.tile(em_crop(0, 0, 0, 256, 256), (3, 3))
    async with running_app(jobs_app(weights, tmp_path)) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        with stepped(service) as stepper:
            job = (await submit(client, tiff_bytes(big))).json()
            await stepper.allow(1)
            await wait_state(client, job["id"], ("running",))
            r = await client.delete(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200
            assert r.json()["state"] == "cancelled"
            stepper.open()
            # The worker notices at its next report and drops the job's tiles.
            await until(lambda: not service.batcher.queued_images, "the queue to empty")
        assert await metric(client, "unet_job_tiles_queued") == 0
        assert (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404
        assert not (tmp_path / "jobs" / job["id"]).exists()
        # The worker goes on: the next job finishes.
        nxt = (await submit(client, tiff_bytes(em_crop(1, 0, 0, 100, 100)))).json()
        assert (await wait_state(client, nxt["id"]))["state"] == "done"


async def test_requests_go_before_queued_job_tiles(weights: Path, tmp_path: Path) -> None:
    big = np.tile(em_crop(0, 0, 0, 256, 256), (2, 2))
    app = jobs_app(weights, tmp_path, max_batch_tiles=4, job_batch_tiles=1)
    async with running_app(app) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        with stepped(service) as stepper:
            job = (await submit(client, tiff_bytes(big))).json()
            await stepper.allow(1)  # the job holds the worker: one of its tiles per pass
            await wait_state(client, job["id"], ("running",))
            request = asyncio.create_task(
                client.post("/v1/segment", files={"file": png_bytes(em_crop(1, 0, 0, 60, 60))})
            )
            await until(lambda: service.batcher.queued_tiles, "the request's tile in the queue")
            # The job's pass already waiting for its permit, then the request's: the next
            # job tile waits although it was queued first.
            await stepper.allow(2)
            done, _ = await asyncio.wait({request}, timeout=60)
            assert request in done
            assert request.result().status_code == 200
            # Three passes in all (a permit is needed for each): the job's first two, then
            # the request's; a request behind the job's queued tiles would need many more.
            assert stepper.completed == 3
            stepper.open()
            assert (await wait_state(client, job["id"]))["state"] == "done"


async def test_other_keys_jobs_are_not_found(weights: Path, tmp_path: Path) -> None:
    app = jobs_app(weights, tmp_path, api_keys="alice-key,bob-key")
    alice = {"Authorization": "Bearer alice-key"}
    bob = {"Authorization": "Bearer bob-key"}
    async with running_app(app) as client:
        data = png_bytes(em_crop(0, 0, 0, 64, 64))
        assert (await client.post("/v1/jobs", files={"file": data})).status_code == 401
        r = await client.post("/v1/jobs", files={"file": data}, headers=alice)
        assert r.status_code == 202
        job_id = r.json()["id"]
        await wait_state(client, job_id, headers=alice)
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"):
            assert (await client.get(path, headers=bob)).status_code == 404
            assert (await client.get(path, headers=alice)).status_code == 200
        assert (await client.delete(f"/v1/jobs/{job_id}", headers=bob)).status_code == 404
        assert (await client.get("/v1/jobs", headers=bob)).json() == {"jobs": [], "next": None}
        assert len((await client.get("/v1/jobs", headers=alice)).json()["jobs"]) == 1


async def test_unknown_job_is_404(weights: Path, tmp_path: Path) -> None:
    async with running_app(jobs_app(weights, tmp_path)) as client:
        for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/nonsense/result"):
            r = await client.get(path)
            assert r.status_code == 404 and "error" in r.json()
        assert (await client.delete("/v1/jobs/nonsense")).status_code == 404


async def test_limits_are_clear_errors_leaving_no_files(weights: Path, tmp_path: Path) -> None:
    data = tiff_bytes(em_crop(0, 0, 0, 300, 300))
    app = jobs_app(weights, tmp_path / "b", max_job_pixels=200 * 200)
    async with running_app(app) as client:
        r = await submit(client, data)
        assert r.status_code == 413 and "error" in r.json()
        r = await submit(client, tiff_bytes(em_crop(0, 0, 0, 100, 100), em_crop(1, 0, 0, 100, 120)))
        assert r.status_code == 422 and "page" in r.json()["error"]
        r = await submit(client, tiff_bytes(em_crop(0, 0, 0, 150, 150))[:-3000])
        assert r.status_code == 422, r.text
        r = await submit(client, b"not an image at all")
        assert r.status_code == 415
        r = await client.post("/v1/jobs", params={"tta": 3}, files={"file": data})
        assert r.status_code == 422
        dirs = [p for p in (tmp_path / "b" / "jobs").iterdir() if p.is_dir()]
        assert dirs == []


async def test_expired_jobs_and_orphan_folders_are_swept_at_start(
    weights: Path, tmp_path: Path
) -> None:
    async with running_app(jobs_app(weights, tmp_path)) as client:
        job = (await submit(client, tiff_bytes(em_crop(0, 0, 0, 80, 80)))).json()
        assert (await wait_state(client, job["id"]))["state"] == "done"
    # A folder no job owns, untouched for two hours (an upload cut off by a crash).
    orphan = tmp_path / "jobs" / ("f" * 32)
    orphan.mkdir()
    (orphan / "input.part").write_bytes(b"partial")
    for path in (orphan / "input.part", orphan):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    async with running_app(jobs_app(weights, tmp_path, jobs_ttl_h=1e-6)) as client:

        async def expired() -> bool:
            return (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404

        await until(expired, "the finished job to expire")
        await until(lambda: not orphan.exists(), "the orphan folder to go")
        assert not (tmp_path / "jobs" / job["id"]).exists()


async def test_whole_page_outputs_equal_the_synchronous_ones(weights: Path, tmp_path: Path) -> None:
    pages = [em_crop(3, 0, 0, 90, 110), em_crop(4, 5, 5, 90, 110)]
    async with running_app(jobs_app(weights, tmp_path)) as client:
        threshold = service_of(client._transport.app).info.threshold  # type: ignore[attr-defined]
        for params in ({"output": "overlay"}, {"output": "probabilities", "tta": 8}):
            r = await submit(client, tiff_bytes(*pages), **params)
            assert r.status_code == 202, r.text
            done = await wait_state(client, r.json()["id"])
            assert done["state"] == "done", done
            got = pages_of((await client.get(done["result"]["url"])).content)
            assert len(got) == 2
            for page, plane in zip(pages, got, strict=True):
                sync = await client.post(
                    "/v1/segment", params=params, files={"file": png_bytes(page)}
                )
                assert sync.status_code == 200
                # Job pages run in batches of their own size: docs/inference.md's tolerances.
                if params["output"] == "overlay":
                    expected = np.asarray(Image.open(io.BytesIO(sync.content)))
                    probs = await client.post(
                        "/v1/segment",
                        params={"output": "probabilities"},
                        files={"file": png_bytes(page)},
                    )
                    p = np.load(io.BytesIO(probs.content))
                    clear = np.abs(p - threshold) > 1e-5
                    assert plane.shape == expected.shape
                    assert np.array_equal(plane[clear], expected[clear])
                else:
                    expected = np.load(io.BytesIO(sync.content))
                    assert plane.shape == expected.shape
                    np.testing.assert_allclose(plane, expected, rtol=0, atol=1e-5)


async def sync_pages(client: httpx.AsyncClient, pages, **params) -> np.ndarray:
    """Each page sent alone to /v1/segment, its answers stacked."""
    answers = []
    for page in pages:
        r = await client.post("/v1/segment", params=params, files={"file": png_bytes(page)})
        assert r.status_code == 200, r.text
        if r.headers["content-type"] == "application/octet-stream":
            answers.append(np.load(io.BytesIO(r.content)))
        else:
            answers.append(np.asarray(Image.open(io.BytesIO(r.content))))
    return np.stack(answers)


async def test_every_stack_result_is_one_imagej_volume(weights: Path, tmp_path: Path) -> None:
    """What tifffile.imread (scikit-image, napari) and Fiji open: the whole (D, H, W) volume,
    streamed or computed page by page, each page as that page sent alone."""
    pages = [em_crop(5, 0, 0, 90, 110), em_crop(6, 5, 5, 90, 110)]
    cases = [
        ({"output": "mask"}, np.uint8),
        ({"output": "probabilities"}, np.float32),
        ({"output": "instances"}, np.uint16),  # ids that fit: 16-bit, as /v1/segment's
        ({"output": "overlay"}, np.uint8),
        ({"output": "mask", "tta": 8}, np.uint8),
    ]
    async with running_app(jobs_app(weights, tmp_path)) as client:
        threshold = service_of(client._transport.app).info.threshold  # type: ignore[attr-defined]
        for params, dtype in cases:
            r = await submit(client, tiff_bytes(*pages), **params)
            assert r.status_code == 202, r.text
            done = await wait_state(client, r.json()["id"])
            assert done["state"] == "done", done
            volume = read_volume((await client.get(done["result"]["url"])).content)
            assert volume.dtype == dtype, params
            expected = await sync_pages(client, pages, **params)
            assert volume.shape == expected.shape == (2, 90, 110, 3)[: expected.ndim], params
            if params["output"] == "probabilities":
                np.testing.assert_allclose(volume, expected, rtol=0, atol=1e-5)
                continue
            # Equal wherever float noise (docs/inference.md's 1e-5) cannot flip the decision.
            tta = {"tta": params["tta"]} if "tta" in params else {}
            probs = await sync_pages(client, pages, output="probabilities", **tta)
            clear = np.abs(probs - threshold) > 1e-5
            if params["output"] == "instances":
                np.testing.assert_array_equal(volume, expected)  # as a one-page job's
            else:
                np.testing.assert_array_equal(volume[clear], expected[clear], err_msg=str(params))
            job_dir = tmp_path / "jobs" / done["id"]
            assert not (job_dir / to_file.LABELS_SPOOL).exists()


async def test_cell_ids_beyond_16_bits_keep_the_32_bit_spool(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose largest id needs 32 bits gives its 32-bit spool as the result, still one
    ImageJ volume with the ids exact (a page of 65536 cells is not made here: the choice of
    type is forced instead)."""
    pages = [em_crop(5, 0, 0, 90, 110), em_crop(6, 5, 5, 90, 110)]
    async with running_app(jobs_app(weights, tmp_path)) as client:
        r = await submit(client, tiff_bytes(*pages), output="instances")
        done = await wait_state(client, r.json()["id"])
        sixteen = read_volume((await client.get(done["result"]["url"])).content)
        monkeypatch.setattr(to_file, "labels_dtype", lambda top: np.dtype(np.uint32))
        r = await submit(client, tiff_bytes(*pages), output="instances")
        done = await wait_state(client, r.json()["id"])
        assert done["state"] == "done", done
        volume = read_volume((await client.get(done["result"]["url"])).content)
    assert sixteen.dtype == np.uint16 and volume.dtype == np.uint32
    np.testing.assert_array_equal(volume, sixteen)


async def test_lying_stacks_are_refused_before_the_202(weights: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    pages = np.stack([em_crop(i, 0, 0, 64, 80) for i in range(3)])
    tifffile.imwrite(buf, pages, imagej=True, metadata={"axes": "ZYX"})
    honest = buf.getvalue()
    assert b"images=3\nslices=3" in honest
    million = honest.replace(b"images=3\nslices=3", b"images=1000000\nslices=1000000")
    nine = honest.replace(b"images=3\nslices=3", b"images=9\nslices=9")
    async with running_app(jobs_app(weights, tmp_path)) as client:
        r = await submit(client, million)
        assert r.status_code == 413 and "declares 1000000 pages" in r.json()["error"]
        r = await submit(client, nine)
        assert r.status_code == 422 and "declares 9 pages but holds 3" in r.json()["error"]
        r = await submit(client, honest)
        assert r.status_code == 202 and r.json()["input"]["pages"] == 3
    folders = [p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir()]
    assert folders == [r.json()["id"]]  # the refused uploads left nothing on disk
