"""Any failure inside the worker, while a batch is formed, computed or stitched, fails
exactly the requests with tiles in that batch, at once, with a JSON 500; every other
request is served and the worker goes on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from app_helpers import em_crop, gated, make_app, metric, png_bytes, running, save_tiny, service_of

from unet_service.core.tiling import Stitcher
from unet_service.pipeline.tiled_image import TiledImage

pytestmark = pytest.mark.anyio

VICTIM = np.full((50, 50), 77, np.uint8)  # one tile of 60, recognisable by its shape
PARTNER = em_crop(1, 0, 0, 40, 45)  # one tile of 60: shares the victim's batch
BYSTANDER = em_crop(2, 0, 0, 25, 30)  # one tile of 32: never in a batch of 60s
OPENER = em_crop(3, 0, 0, 12, 12)  # one tile of 16: holds the worker while the rest queue


class InjectedError(RuntimeError):
    pass


def inject(stage: str, app, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the given stage fail whenever it handles the victim's tile."""
    segmenter = service_of(app).segmenter
    victim_rows = VICTIM.shape[0]
    if stage == "form":
        real_input = TiledImage.tile_input

        def tile_input(self, tile):
            if self.plan.height == victim_rows:
                raise InjectedError("cutting the tile failed")
            return real_input(self, tile)

        monkeypatch.setattr(TiledImage, "tile_input", tile_input)
    elif stage == "compute":
        real_forward: Callable[[np.ndarray], np.ndarray] = segmenter.forward
        victim_value = segmenter.normalize(VICTIM[None, :1, :1])[0, 0, 0]

        def forward(batch: np.ndarray) -> np.ndarray:
            if np.any(np.all(batch == victim_value, axis=(1, 2, 3))):
                raise InjectedError("the forward pass failed")
            return real_forward(batch)

        monkeypatch.setattr(segmenter, "forward", forward)
    elif stage == "stitch":
        real_aggregate = Stitcher.aggregate

        def aggregate(self, values, tile):
            if self.plan.height == victim_rows:
                raise InjectedError("stitching failed")
            return real_aggregate(self, values, tile)

        monkeypatch.setattr(Stitcher, "aggregate", aggregate)
    elif stage == "finalize":
        real_finalize = Stitcher.finalize

        def finalize(self):
            if self.plan.height == victim_rows:
                raise InjectedError("finalising failed")
            return real_finalize(self)

        monkeypatch.setattr(Stitcher, "finalize", finalize)


@pytest.mark.parametrize("stage", ["form", "compute", "stitch", "finalize"])
async def test_a_failing_stage_fails_exactly_its_batch_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    # A one-minute deadline: a request left hanging would come back 504, not 500.
    app = make_app(save_tiny(tmp_path), max_batch_tiles=8, max_wait_ms=0, request_timeout_s=60)
    async with running(app) as client:

        def post(pixels: np.ndarray, name: str) -> asyncio.Future:
            files = {"file": (f"{name}.png", png_bytes(pixels), "image/png")}
            return asyncio.ensure_future(client.post("/v1/segment", files=files))

        inject(stage, app, monkeypatch)
        with gated(service_of(app)) as gate:
            opener = post(OPENER, "opener")
            await asyncio.to_thread(gate.entered.wait, 30)
            victim = post(VICTIM, "victim")
            while await metric(client, "unet_queue_images") < 2:
                await asyncio.sleep(0.005)
            partner = post(PARTNER, "partner")
            bystander = post(BYSTANDER, "bystander")
            while await metric(client, "unet_queue_images") < 4:
                await asyncio.sleep(0.005)
        responses = await asyncio.gather(opener, victim, partner, bystander)
        by_name = dict(zip(["opener", "victim", "partner", "bystander"], responses, strict=True))
        for name in ("victim", "partner"):  # their tiles shared the failing batch
            r = by_name[name]
            assert r.status_code == 500, (name, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert "inference failed" in error and "Traceback" not in error
        for name in ("opener", "bystander"):
            assert by_name[name].status_code == 200, (name, by_name[name].text)
        assert await metric(client, "unet_worker_errors_total") == 1
        assert await metric(client, "unet_queue_tiles") == 0
        monkeypatch.undo()
        # The worker goes on: the victim's own image is served once the fault is gone.
        again = await client.post("/v1/segment", files={"file": ("v.png", png_bytes(VICTIM))})
        assert again.status_code == 200
