"""Cross-request batching is real: concurrent requests of different images share forward
passes, each still gets exactly its own result; a huge image does not starve small ones;
cancelled requests leave the queue; out-of-memory halves the batch."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import (
    em_crop,
    gated,
    make_app,
    metric,
    metric_total,
    png_bytes,
    running,
    save_tiny,
    service_of,
    stepped,
)
from PIL import Image

from unet_service.core.engine import Segmenter
from unet_service.core.geometry import Geometry
from unet_service.core.tiling import choose_tile_size
from unet_service.core.tiling import tile_sizes as tile_buckets

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


def test_tile_buckets_and_choice() -> None:
    assert tile_buckets(Geometry(4), 388) == (100, 196, 388)
    assert tile_buckets(Geometry(4), 516) == (132, 260, 516)
    assert tile_buckets(Geometry(2), 60) == (16, 32, 60)
    g = Geometry(4)
    buckets = (132, 260, 516)
    assert choose_tile_size(50, 80, buckets, g) == 132  # one small tile, not a padded 516
    assert choose_tile_size(150, 101, buckets, g) == 260
    assert choose_tile_size(512, 512, buckets, g) == 516  # an ISBI slice: exactly one tile
    assert choose_tile_size(300, 20, buckets, g) == 132  # a thin strip: 3 small tiles
    assert choose_tile_size(700, 1000, buckets, g) == 516
    assert choose_tile_size(4000, 3000, buckets, g) == 516
    with pytest.raises(ValueError, match="nearest legal"):
        tile_buckets(Geometry(4), 390)


# (index, top, left, height, width): different slices, sizes and tile buckets.
CROPS = [
    (0, 0, 0, 100, 100),  # 2 x 2 tiles of 60
    (1, 30, 40, 90, 120),  # 2 x 2
    (2, 100, 7, 64, 64),  # 2 x 2
    (3, 5, 300, 110, 70),  # 2 x 2
    (4, 200, 200, 30, 30),  # bucket 32, 1 tile
    (5, 9, 9, 20, 25),  # bucket 32, 1 tile
]


async def test_concurrent_images_share_forward_passes_and_keep_their_own_results(
    weights: Path,
) -> None:
    app = make_app(weights, max_batch_tiles=16, max_wait_ms=300)
    images = [em_crop(*crop) for crop in CROPS]
    async with running(app) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/segment",
                    params={"output": "probabilities"},
                    files={"file": (f"{i}.png", png_bytes(image), "image/png")},
                )
                for i, image in enumerate(images)
            )
        )
        # The warm-up runs outside the batcher: every counted pass served these requests.
        first_passes = await metric(client, "unet_forward_passes_total")
        passes_over_4 = first_passes - await metric(client, "unet_batch_tiles_bucket", le="4.0")
        masks = await asyncio.gather(
            *(
                client.post("/v1/segment", files={"file": (f"{i}.png", png_bytes(image))})
                for i, image in enumerate(images)
            )
        )
        passes = await metric(client, "unet_forward_passes_total")
    tiles = sum(int(r.headers["x-tiles"]) for r in responses)
    assert tiles == 18
    # Tiles one by one: 36 passes; one pass per request: 12. Batched across requests, the 16
    # tiles of size 60 and the 2 of size 32 of each round fit in 2 passes ([16, 2, 16, 2]).
    assert passes < 2 * len(CROPS), passes
    assert passes_over_4 > 0  # some pass held tiles of several requests

    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    for image, r, m in zip(images, responses, masks, strict=True):
        assert r.status_code == 200 and m.status_code == 200
        alone = seg.segment(
            image[:, :, None], int(r.headers["x-tile-size"]), batch_size=1, probabilities=True
        )
        probs = np.load(io.BytesIO(r.content))
        np.testing.assert_allclose(probs, alone.probabilities[0], atol=1e-5)
        mask = np.asarray(Image.open(io.BytesIO(m.content))) // 255
        decided = np.abs(alone.probabilities[0] - seg.card.threshold) > 1e-5
        np.testing.assert_array_equal(mask[decided], alone.mask[decided])


async def test_a_lone_request_does_not_wait_for_a_batch(weights: Path) -> None:
    """The batch window is only waited out while other requests are on their way: with
    nothing else arriving, a single request starts at once. Were it to wait for the
    ten-minute window, its one-minute deadline would answer 504 instead."""
    app = make_app(weights, max_batch_tiles=16, max_wait_ms=600_000, request_timeout_s=60)
    async with running(app) as client:
        r = await client.post(
            "/v1/segment", files={"file": ("a.png", png_bytes(em_crop(0, 0, 0, 50, 50)))}
        )
        assert r.status_code == 200, r.text


async def test_huge_image_does_not_starve_small_ones(weights: Path) -> None:
    """Passes run only when the test allows them. While the huge image's first pass is
    held, two small images of two tile sizes arrive; three more passes (the held one, then
    one per tile size, round-robin) serve both, long before the 16 passes the huge image
    needs."""
    app = make_app(weights, max_batch_tiles=4, max_wait_ms=0)
    async with running(app) as client:
        with stepped(service_of(app)) as stepper:
            big = asyncio.ensure_future(
                client.post(
                    "/v1/segment",
                    files={"file": ("big.png", png_bytes(em_crop(0, 0, 0, 480, 480)))},
                )
            )
            await asyncio.to_thread(stepper.entered.wait, 30)
            same_bucket = asyncio.ensure_future(
                client.post(
                    "/v1/segment", files={"file": ("s.png", png_bytes(em_crop(1, 0, 0, 50, 50)))}
                )
            )
            other_bucket = asyncio.ensure_future(
                client.post(
                    "/v1/segment", files={"file": ("t.png", png_bytes(em_crop(2, 0, 0, 25, 30)))}
                )
            )
            while await metric(client, "unet_queue_images") < 3:
                await asyncio.sleep(0.005)
            await stepper.allow(3)
            smalls = await asyncio.wait_for(asyncio.gather(same_bucket, other_bucket), 60)
            assert not big.done()  # 64 tiles at 4 per pass: 13 passes still to go
            for r in smalls:
                assert r.status_code == 200
                assert r.headers["x-batches"] == "1"
            stepper.open()
            r_big = await big
        assert r_big.status_code == 200 and r_big.headers["x-tiles"] == "64"
        assert await metric(client, "unet_queue_tiles") == 0


async def test_cancelled_request_leaves_the_queue_empty(weights: Path) -> None:
    app = make_app(weights, max_batch_tiles=2, drain_timeout_s=1)
    async with running(app) as client:
        batcher = service_of(app).batcher
        with gated(service_of(app)) as gate:
            request = asyncio.ensure_future(
                client.post(
                    "/v1/segment", files={"file": ("a.png", png_bytes(em_crop(0, 0, 0, 240, 240)))}
                )
            )
            while not (gate.entered.is_set() and batcher.queued_tiles == 16):
                await asyncio.sleep(0.005)
            request.cancel()  # the client gives up while 14 of its tiles wait in the queue
            with pytest.raises(asyncio.CancelledError):
                await request
            assert batcher.queued_tiles == 0 and batcher.queued_images == 0
        r = await client.post(
            "/v1/segment", files={"file": ("b.png", png_bytes(em_crop(1, 0, 0, 50, 50)))}
        )
        assert r.status_code == 200
        # The batch in flight, then the new image: the cancelled tiles were never computed.
        assert await metric(client, "unet_tiles_total") == 2 + 1
        assert await metric(client, "unet_queue_tiles") == 0


async def test_out_of_memory_halves_the_batch_and_retries(weights: Path) -> None:
    app = make_app(weights, max_batch_tiles=8)
    image = em_crop(6, 0, 0, 240, 240)  # 16 tiles
    async with running(app) as client:
        service = service_of(app)
        real = service.segmenter.forward
        sizes: list[int] = []

        def small_device(batch: np.ndarray) -> np.ndarray:
            sizes.append(len(batch))
            if len(batch) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(batch)

        service.segmenter.forward = small_device
        r = await client.post(
            "/v1/segment",
            params={"output": "probabilities"},
            files={"file": ("a.png", png_bytes(image))},
        )
        assert r.status_code == 200, r.text
        assert service.runner.limit == 2
        # Halved until it fits; the rest of that batch and later ones use the lowered limit.
        assert sizes == [8, 4, 2, 2, 2, 2] + [2] * 4
        metrics = (await client.get("/metrics")).text
    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    alone = seg.segment(image[:, :, None], 60, probabilities=True)
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), alone.probabilities[0], atol=1e-5)
    assert metric_total(metrics, "unet_oom_splits_total", model="tiny") > 0
