"""`POST /v1/preview` with `colour`: a mask or instances answer of /v1/segment, sent back, as
RGBA in the overlay's colours (each class above 0, or each cell, opaque; the rest
transparent), one page of a stack's TIFF, 32-bit cell ids as they are, labels scaled down by
the pixel under each one's centre (never averaged); uploads that hold no labels are a 422."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import em_crop, make_app, png_bytes, running, save_tiny, tiff_bytes
from PIL import Image
from test_app_errors import assert_json_error

from unet_service.imaging.display import PALETTE, label_colours
from unet_service.imaging.tiff_volume import labels_bytes

pytestmark = pytest.mark.anyio


def upload(data: bytes) -> dict:
    return {"file": ("answer", data, "application/octet-stream")}


def rgba(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.mode == "RGBA"
    return np.asarray(image)


def class_colours(classes: np.ndarray) -> np.ndarray:
    """What the preview must show for (H, W) class indices: the overlay's palette, opaque
    above 0, transparent black at 0."""
    out = np.zeros((*classes.shape, 4), np.uint8)
    tinted = classes > 0
    out[tinted, :3] = PALETTE[(classes[tinted].astype(int) - 1) % len(PALETTE)]
    out[tinted, 3] = 255
    return out


def cell_colours(ids: np.ndarray) -> np.ndarray:
    """The instance overlay's colour of every cell, opaque; 0 transparent black."""
    out = np.zeros((*ids.shape, 4), np.uint8)
    out[..., :3] = label_colours(ids)
    out[..., 3] = np.where(ids > 0, 255, 0)
    return out


async def test_masks_and_instances_are_shown_in_the_overlays_colours(tmp_path: Path) -> None:
    crop = png_bytes(em_crop(3, 0, 0, 120, 160))
    stack = tiff_bytes(*[em_crop(i, 0, 0, 80, 96) for i in range(3)])
    async with running(make_app(save_tiny(tmp_path))) as client:

        async def segment(data: bytes, output: str) -> bytes:
            r = await client.post("/v1/segment", params={"output": output}, files=upload(data))
            assert r.status_code == 200, r.text
            return r.content

        async def preview(data: bytes, colour: str, **params: object) -> np.ndarray:
            params = {"colour": colour, **params}
            r = await client.post("/v1/preview", params=params, files=upload(data))
            assert r.status_code == 200, r.text
            return rgba(r.content)

        mask_png = await segment(crop, "mask")
        mask = np.asarray(Image.open(io.BytesIO(mask_png)))
        assert 0 < (mask > 0).mean() < 1
        assert np.array_equal(await preview(mask_png, "classes"), class_colours(mask // 255))
        # Scaled down by the pixel under each one's centre: 4 x 4 pixels -> the one at (2, 2).
        small = await preview(mask_png, "classes", max_side=40)
        assert np.array_equal(small, class_colours(mask[2::4, 2::4] // 255))

        instances_png = await segment(crop, "instances")
        ids = np.asarray(Image.open(io.BytesIO(instances_png)))
        assert ids.dtype == np.uint16 and ids.max() > 1
        assert np.array_equal(await preview(instances_png, "instances"), cell_colours(ids))
        small = await preview(instances_png, "instances", max_side=40)
        assert np.array_equal(small, cell_colours(ids[2::4, 2::4]))

        # A stack's answers are TIFF volumes: page N of them.
        masks = tifffile.imread(io.BytesIO(await segment(stack, "mask")))
        cells = tifffile.imread(io.BytesIO(await segment(stack, "instances")))
        assert masks.shape == cells.shape == (3, 80, 96)
        for page in (1, 3):
            got = await preview(await segment(stack, "mask"), "classes", page=page)
            assert np.array_equal(got, class_colours(masks[page - 1] // 255)), page
            got = await preview(await segment(stack, "instances"), "instances", page=page)
            assert np.array_equal(got, cell_colours(cells[page - 1])), page

        # Beyond 65535 cells the ids come as a 32-bit TIFF; they are coloured as they are.
        big_ids = np.where(ids > 0, ids.astype(np.uint32) * 7919 + 65536, 0).astype(np.uint32)
        volume = labels_bytes([big_ids])
        assert tifffile.imread(io.BytesIO(volume)).dtype == np.uint32
        assert np.array_equal(await preview(volume, "instances"), cell_colours(big_ids))
        two_pages = labels_bytes([ids.astype(np.uint32), big_ids])
        got = await preview(two_pages, "instances", page=2)
        assert np.array_equal(got, cell_colours(big_ids))


async def test_several_classes_each_in_its_colour(tmp_path: Path) -> None:
    crop = png_bytes(em_crop(3, 0, 0, 80, 96))
    async with running(make_app(save_tiny(tmp_path, out_channels=3))) as client:
        r = await client.post("/v1/segment", files=upload(crop))
        mask = np.asarray(Image.open(io.BytesIO(r.content)))
        assert set(np.unique(mask)) == {0, 1, 2}
        r = await client.post("/v1/preview", params={"colour": "classes"}, files=upload(r.content))
        assert r.status_code == 200, r.text
        assert np.array_equal(rgba(r.content), class_colours(mask))


async def test_uploads_without_labels_are_refused(tmp_path: Path) -> None:
    em = em_crop(0, 0, 0, 40, 50)
    refused = {
        ("classes", "rgb.png"): png_bytes(np.stack([em] * 3, axis=-1)),
        ("classes", "u16.tif"): tiff_bytes(em.astype(np.uint16) * 200),
        ("instances", "float.tif"): tiff_bytes(em.astype(np.float32) / 255),
        ("instances", "rgb.png"): png_bytes(np.stack([em] * 3, axis=-1)),
    }
    async with running(make_app(save_tiny(tmp_path))) as client:
        for (colour, name), data in refused.items():
            params = {"colour": colour}
            r = await client.post("/v1/preview", params=params, files=upload(data))
            assert_json_error(r, 422, f"colour={colour}")
            assert "channel" in r.json()["error"] or "8-bit" in r.json()["error"], name
        r = await client.post(
            "/v1/preview", params={"colour": "cells"}, files=upload(png_bytes(em))
        )
        assert_json_error(r, 422, "colour")
