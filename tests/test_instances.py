"""Cell instances: a seeded watershed separates cells that a threshold merges through a
faint gap, and the service's two APIs and unet-predict give the same labels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from app_helpers import binary_infer, make_app, metric, png_bytes, running, save_tiny
from PIL import Image
from skimage.measure import label
from skimage.segmentation import watershed

import unet_service.pipeline.instances
from conftest import isbi_slice
from unet_service.cli.predict import main as predict
from unet_service.core.engine import DEFAULT_WEIGHTS, Segmenter
from unet_service.pipeline.instances import CORE, InstanceParams, interior_levels, label_instances


def cells_image() -> tuple[np.ndarray, int]:
    """A probability map of a 3 x 4 grid of square cells (0.95 inside) behind 3-px
    membranes (0.05), where one membrane has a 1-px gap of 0.5: above the 0.35 threshold,
    so thresholding merges the two cells it separates."""
    prob = np.full((3 * 30 + 3, 4 * 30 + 3), 0.05, np.float32)
    for r in range(3):
        for c in range(4):
            prob[3 + 30 * r : 30 * (r + 1), 3 + 30 * c : 30 * (c + 1)] = 0.95
    prob[10, 30:33] = 0.5  # a faint spot in the membrane between cells (0, 0) and (0, 1)
    return prob, 12


def test_watershed_separates_cells_a_threshold_merges() -> None:
    prob, cells = cells_image()
    assert label(prob > 0.35, connectivity=1).max() == cells - 1  # merged through the gap
    labels = label_instances(prob, 0.35, InstanceParams(seed_threshold=0.9, min_size=16))
    assert labels.dtype == np.uint32
    assert labels.max() == cells and set(np.unique(labels)) == set(range(cells + 1))
    assert (labels[prob < 0.35] == 0).all()  # membranes stay background
    for r in range(3):  # every cell is one label, and no two cells share one
        for c in range(4):
            inside = labels[3 + 30 * r : 30 * (r + 1), 3 + 30 * c : 30 * (c + 1)]
            assert len(np.unique(inside)) == 1 and inside[0, 0] > 0
    # Objects under min_size go; labels stay 1..N.
    speck = prob.copy()
    speck[1, 1] = 0.99
    kept = label_instances(speck, 0.35, InstanceParams(seed_threshold=0.9, min_size=16))
    assert kept.max() == cells and kept[1, 1] == 0


def test_smoothing_merges_nothing_it_should_not() -> None:
    prob, cells = cells_image()
    params = InstanceParams(seed_threshold=0.9, min_size=16, smoothing=1.0)
    assert label_instances(prob, 0.35, params).max() == cells


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images cut the same objects (ids may differ), 0 alike."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return bool(((a == 0) == (b == 0)).all()) and len(np.unique(pairs[0])) == pairs.shape[1] == len(
        np.unique(pairs[1])
    )


@pytest.fixture(scope="module")
def real_map() -> np.ndarray:
    """The shipped model's probabilities of a real slice: many cells, and regions that
    hold several seed cores (cells merged through faint membrane)."""
    seg = Segmenter.from_weights(DEFAULT_WEIGHTS, device="cpu")
    probs = seg.segment(isbi_slice(22)[:300, :300, None], 308, probabilities=True).probabilities
    assert probs is not None
    return probs[0]


@pytest.mark.parametrize(
    "params",
    [
        InstanceParams(seed_threshold=0.85, smoothing=1.0, min_size=0),
        InstanceParams(seed_threshold=0.9, smoothing=0.0, min_size=16),
    ],
)
def test_flooding_each_region_alone_equals_one_whole_image_watershed(
    real_map: np.ndarray, params: InstanceParams
) -> None:
    """Regions are flooded one at a time in their bounding boxes, and one-core regions
    not at all: the cells are exactly those of one watershed of the whole map from all
    the cores, minus objects under min_size, numbered 1..N."""
    levels = interior_levels(real_map, 0.35, params)
    cores = label(levels == CORE, connectivity=1)
    whole = watershed(CORE - levels, markers=cores, mask=levels > 0)
    if params.min_size > 1:
        sizes = np.bincount(whole.ravel())
        whole[sizes[whole] < params.min_size] = 0
    labels = label_instances(real_map, 0.35, params)
    assert labels.dtype == np.uint32
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))
    assert labels.max() > 30 and same_partition(labels, whole)
    # Some region above the threshold was split between its cores.
    regions = label(levels > 0, connectivity=1)
    core_regions = np.unique(np.stack([cores[cores > 0], regions[cores > 0]]), axis=1)[1]
    assert np.count_nonzero(np.bincount(core_regions) > 1) >= 1


def test_smoothing_strip_by_strip_equals_smoothing_the_whole_map(
    real_map: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = InstanceParams(seed_threshold=0.85, smoothing=1.5)
    whole = interior_levels(real_map, 0.35, params)  # one strip: 300 rows < STRIP_ROWS
    monkeypatch.setattr(unet_service.pipeline.instances, "STRIP_ROWS", 7)
    np.testing.assert_array_equal(interior_levels(real_map, 0.35, params), whole)
    assert (whole == CORE).any() and (whole == 0).any()


def test_split_pieces_under_min_size_are_dropped() -> None:
    """A region with two cores joined through a gap is split; a piece under min_size
    goes, the other keeps a label, and the labels stay 1..N."""
    prob = np.full((40, 60), 0.05, np.float32)
    prob[5:35, 5:35] = 0.95  # a big cell
    prob[10:14, 35:39] = 0.6  # a faint bridge, flooded half from either end
    prob[11:13, 39:41] = 0.95  # a tiny core at its end: 4 pixels, about 12 with the bridge
    labels = label_instances(prob, 0.35, InstanceParams(seed_threshold=0.9, min_size=16))
    assert labels.max() == 1 and labels[20, 20] == 1 and labels[12, 40] == 0
    both = label_instances(prob, 0.35, InstanceParams(seed_threshold=0.9, min_size=0))
    assert both.max() == 2 and both[12, 40] == 2 and both[12, 36] == 1


@pytest.mark.anyio
async def test_the_three_interfaces_give_the_same_labels(tmp_path: Path) -> None:
    """The shipped model (decisive probabilities) on a real slice: /v1, /v2 and
    unet-predict agree with the engine, label for label."""
    pixels = isbi_slice(21)[:200, :260]
    upload = tmp_path / "slice.png"
    upload.write_bytes(png_bytes(pixels))
    seg = Segmenter.from_weights(DEFAULT_WEIGHTS, device="cpu")
    expected = seg.instances(seg.segment(pixels[:, :, None], 260, probabilities=True).probabilities)
    assert expected.max() > 20  # a real slice has many cells

    app = make_app(DEFAULT_WEIGHTS, tile_size=516, backend="auto", max_batch_tiles=2)
    async with running(app) as client:
        v1 = await client.post(
            "/v1/segment",
            params={"output": "instances"},
            files={"file": ("s.png", png_bytes(pixels))},
        )
        assert v1.status_code == 200 and v1.headers["content-type"] == "image/png"
        body, headers = binary_infer(pixels, "UINT8", ["instances"])
        v2 = await client.post("/v2/models/isbi2012/infer", content=body, headers=headers)
        assert v2.status_code == 200, v2.text
    from_v1 = np.asarray(Image.open(io.BytesIO(v1.content))).astype(np.uint32)
    length = int(v2.headers["inference-header-content-length"])
    meta = json.loads(v2.content[:length])
    assert meta["outputs"][0]["datatype"] == "UINT32"
    from_v2 = np.frombuffer(v2.content[length:], "<u4").reshape(200, 260)

    out = tmp_path / "out"
    argv = [str(upload), "-o", str(out), "--instances", "--device", "cpu", "--tile-size", "260"]
    assert predict(argv) == 0
    from_cli = np.asarray(Image.open(out / "slice.instances.png")).astype(np.uint32)
    for labels in (from_v1, from_v2, from_cli):
        np.testing.assert_array_equal(labels, expected)


@pytest.mark.anyio
async def test_instances_of_a_several_class_model_are_422_before_inference(
    tmp_path: Path,
) -> None:
    weights = save_tiny(tmp_path, out_channels=3)
    files = {"file": ("s.png", png_bytes(isbi_slice(0)[:40, :40]))}
    async with running(make_app(weights)) as client:
        for params in ({"output": "instances"}, {"output": "overlay", "colour": "instances"}):
            r = await client.post("/v1/segment", params=params, files=files)
            assert r.status_code == 422 and "one-class" in r.json()["error"]
        body, headers = binary_infer(isbi_slice(0)[:40, :40], "UINT8", ["instances"])
        r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 422
        assert "['mask', 'probabilities']" in r.json()["error"]  # what this model has
        assert await metric(client, "unet_tiles_total") == 0  # nothing was computed
        # colour belongs to the overlay.
        r = await client.post("/v1/segment", params={"colour": "instances"}, files=files)
        assert r.status_code == 422 and "overlay" in r.json()["error"]


@pytest.mark.anyio
async def test_overlay_can_colour_instances(tmp_path: Path) -> None:
    pixels = isbi_slice(22)[:160, :200]
    app = make_app(DEFAULT_WEIGHTS, tile_size=516, backend="auto")
    async with running(app) as client:
        files = {"file": ("s.png", png_bytes(pixels))}
        labels_png = await client.post("/v1/segment", params={"output": "instances"}, files=files)
        overlay = await client.post(
            "/v1/segment", params={"output": "overlay", "colour": "instances"}, files=files
        )
        bad = await client.post(
            "/v1/segment", params={"output": "overlay", "colour": "cells"}, files=files
        )
    assert overlay.status_code == 200 and bad.status_code == 422
    labels = np.asarray(Image.open(io.BytesIO(labels_png.content)))
    rgb = np.asarray(Image.open(io.BytesIO(overlay.content))).astype(int)
    background = labels == 0
    assert (rgb[background][:, 0] == pixels[background]).all()  # membranes untinted grey
    # Each cell is tinted in one colour of its own: the tint (overlay minus grey) is
    # constant over a cell's pixels up to rounding, and differs between neighbours.
    tint = rgb - 0.55 * pixels[:, :, None]
    means = {i: tint[labels == i].mean(axis=0) for i in np.unique(labels) if i}
    assert len({tuple(np.round(m / 20)) for m in means.values()}) > len(means) // 3


@pytest.mark.anyio
async def test_instances_of_images_over_their_pixel_limit_are_413(tmp_path: Path) -> None:
    pixels = isbi_slice(1)[:60, :70]
    async with running(make_app(save_tiny(tmp_path), max_instance_pixels=4000)) as client:
        files = {"file": ("s.png", png_bytes(pixels))}
        r = await client.post("/v1/segment", params={"output": "instances"}, files=files)
        assert r.status_code == 413 and "UNET_MAX_INSTANCE_PIXELS" in r.json()["error"]
        body, headers = binary_infer(pixels, "UINT8", ["instances"])
        r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 413
        assert await metric(client, "unet_tiles_total") == 0
        # The mask of the same image is served.
        assert (await client.post("/v1/segment", files=files)).status_code == 200
        small = {"file": ("s.png", png_bytes(pixels[:50, :60]))}
        r = await client.post("/v1/segment", params={"output": "instances"}, files=small)
        assert r.status_code == 200
