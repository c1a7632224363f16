"""Overlap-tile inference is exact: tiled output == one pass over the mirror-padded image.

Exact in arithmetic, that is: every tile computes the same sums as the single pass, but a
CPU's GEMM kernels may add them in another order for another matrix width (seen: one
float64 ulp on an AMD EPYC). So the tests hold what docs/inference.md promises on any machine:
float64 within 1e-12, float32 within 1e-5, masks identical wherever the probability is not
within 1e-5 of the threshold. The stitcher itself, fed by a predictor without arithmetic,
is held to exact equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CHANNELS, tiny_unet
from unet_service.core.engine import Segmenter
from unet_service.core.geometry import Geometry
from unet_service.core.tiling import Stitcher, TilePlan, mirror_pad, reflect_indices
from unet_service.core.weights import ModelCard
from unet_service.imaging.errors import ImageError
from unet_service.pipeline.views import view

SIZES = [(1, 1), (7, 300), (300, 7), (389, 389), (700, 300), (1000, 1000)]
TILE_SIZES = [36, 100]  # legal for depth 2 (4 + 4j)
# What docs/inference.md guarantees on every CPU and GPU (measured: 0 to 1.1e-16 and <= 6e-8).
FLOAT64_TOLERANCE = 1e-12
FLOAT32_TOLERANCE = 1e-5


def make_segmenter(dtype: torch.dtype = torch.float32, channels=TINY_CHANNELS) -> Segmenter:
    card = ModelCard(channels=channels, normalization={"mean": [0.5], "std": [0.25]})
    return Segmenter(tiny_unet(channels).to(dtype), card, device="cpu")


def single_pass(seg: Segmenter, plan: TilePlan, image: np.ndarray) -> np.ndarray:
    """Reference: the network run once over the whole padded canvas, cropped to H x W."""
    canvas = seg.normalize(plan.padded_image(image).transpose(2, 0, 1))[None]
    x = torch.from_numpy(canvas).to(seg._param_dtype)
    with torch.inference_mode():
        out = torch.sigmoid(seg.model(x))[0]
    return out[:, : plan.height, : plan.width].numpy()


def tiled(seg: Segmenter, plan: TilePlan, image: np.ndarray, batch: int = 3) -> np.ndarray:
    """Tiles through the model in batches, stitched, keeping the model's dtype."""
    stitcher = Stitcher(plan, 1, np.float64, track_coverage=True)
    tiles = list(plan)
    for start in range(0, len(tiles), batch):
        chunk = tiles[start : start + batch]
        x = torch.from_numpy(np.stack([seg.tile_input(plan, image, t) for t in chunk]))
        with torch.inference_mode():
            out = torch.sigmoid(seg.model(x.to(seg._param_dtype))).numpy()
        for tile, values in zip(chunk, out, strict=True):
            stitcher.aggregate(values, tile)
    assert (stitcher.coverage == 1).all()
    return stitcher.finalize()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 1), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_tiled_equals_single_pass_float32(h: int, w: int) -> None:
    seg = make_segmenter()
    image = random_image(h, w)
    for tile_size in TILE_SIZES:
        plan = seg.plan(h, w, tile_size)
        result = seg.segment(image, tile_size=tile_size, batch_size=3, probabilities=True)
        reference = single_pass(seg, plan, image)
        assert result.probabilities.shape == (1, h, w)
        assert result.mask.shape == (h, w)
        assert np.abs(result.probabilities - reference).max() <= FLOAT32_TOLERANCE
        decided = np.abs(reference[0] - 0.5) > FLOAT32_TOLERANCE
        assert np.array_equal(result.mask[decided], (reference[0] > 0.5)[decided])


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_tiled_equals_single_pass_float64(h: int, w: int) -> None:
    seg = make_segmenter(torch.float64)
    image = random_image(h, w, seed=1)
    for tile_size in TILE_SIZES:
        plan = seg.plan(h, w, tile_size)
        out = tiled(seg, plan, image)
        assert out.shape == (1, h, w)
        assert np.abs(out - single_pass(seg, plan, image)).max() <= FLOAT64_TOLERANCE


def test_exact_for_a_depth_3_network_with_rgb_input() -> None:
    seg = make_segmenter(torch.float64, channels=[3, 4, 4, 8, 8])
    image = np.random.default_rng(2).integers(0, 65536, (150, 97, 3), dtype=np.uint16)
    plan = seg.plan(150, 97, 44)  # 4 + 8 * 5
    assert len(plan) > 4
    assert (
        np.abs(tiled(seg, plan, image) - single_pass(seg, plan, image)).max() <= FLOAT64_TOLERANCE
    )


def test_tile_grid_origins_are_multiples_of_the_step() -> None:
    plan = TilePlan(1000, 770, Geometry(4), 388)
    assert plan.stride == 384
    assert plan.rows == [0, 384, 768] and plan.cols == [0, 384]
    assert plan.input_size == 572
    assert plan.covered_height == 1156 and Geometry(4).is_legal_output(plan.covered_height)
    assert all(t.row % 16 == 0 and t.col % 16 == 0 for t in plan)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (5, 300), (17, 64), (100, 41)])
def test_stitcher_writes_every_pixel_exactly_once(h: int, w: int) -> None:
    """Identity-like predictor: each tile returns its input's centre; stitched == image."""
    geometry = Geometry(2)
    image = np.random.default_rng(3).random((h, w, 2)).astype(np.float32)
    for tile_size in (4, 8, 20):
        plan = TilePlan(h, w, geometry, tile_size)
        stitcher = Stitcher(plan, 2, np.float32, track_coverage=True)
        m = geometry.margin
        for tile in reversed(list(plan)):  # order does not matter
            window = plan.extract(image, tile)
            stitcher.aggregate(window[:, m : m + tile_size, m : m + tile_size], tile)
        assert (stitcher.coverage == 1).all()
        assert np.array_equal(stitcher.finalize(), image.transpose(2, 0, 1))


def test_stitcher_refuses_duplicates_wrong_shapes_and_missing_tiles() -> None:
    plan = TilePlan(50, 50, Geometry(2), 20)
    stitcher = Stitcher(plan, 1)
    first = next(iter(plan))
    with pytest.raises(ValueError, match="20x20"):
        stitcher.aggregate(np.zeros((1, 16, 16)), first)
    stitcher.aggregate(np.zeros((1, 20, 20)), first)
    with pytest.raises(ValueError, match="already"):
        stitcher.aggregate(np.zeros((1, 20, 20)), first)
    with pytest.raises(RuntimeError, match="never aggregated"):
        stitcher.finalize()


def test_mirror_padding_matches_numpy_reflect_and_handles_huge_pads() -> None:
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(mirror_pad(a, 2, 1, 3, 2), np.pad(a, ((2, 1), (3, 2)), mode="reflect"))
    # Pads far larger than the axis keep reflecting (torch's reflect pad refuses these).
    assert np.array_equal(mirror_pad(a, 9, 9, 9, 9), np.pad(a, 9, mode="reflect"))
    assert np.array_equal(reflect_indices(-5, 6, 1), np.zeros(11, dtype=int))


def test_huge_image_plan_is_lazy() -> None:
    """A 100-megapixel plan holds no tiles: they are cut one at a time from the image."""
    h = w = 10_000
    image = np.broadcast_to(np.uint8(7), (h, w, 1))  # a view: no 100 MB array either
    plan = TilePlan(h, w, Geometry(4), 388)
    assert len(plan) == 27 * 27
    tiles = iter(plan)
    window = plan.extract(image, next(tiles))
    assert window.shape == (1, 572, 572) and window.dtype == np.uint8
    assert next(tiles).col == 384


def test_plan_rejects_illegal_tile_and_empty_image() -> None:
    with pytest.raises(ValueError, match="nearest legal"):
        TilePlan(10, 10, Geometry(4), 390)
    with pytest.raises(ValueError, match="at least 1x1"):
        TilePlan(0, 10, Geometry(4), 388)


def test_float_pixels_beyond_float32_normalisation_are_refused() -> None:
    """3e38 is a finite float32, but normalised it overflows and every probability would be
    NaN (an all-zero mask); large values that stay finite are still segmented."""
    seg = make_segmenter()
    image = np.random.default_rng(0).random((40, 40, 1), dtype=np.float32)
    assert np.isfinite(seg.segment(image * 1e20, probabilities=True).probabilities).all()
    with pytest.raises(ImageError, match=r"within \+-1e\+30.*\[0, 1\]"):
        seg.segment(image * np.float32(3e38))
    with pytest.raises(ImageError, match="finite"):
        seg.segment(np.full((5, 5, 1), np.nan, np.float32))


@pytest.mark.parametrize(("h", "w"), [(1, 1), (37, 60), (130, 95)])
def test_averaged_views_tiled_equal_the_averaged_whole_image_passes(h: int, w: int) -> None:
    """tta=8: each of the 8 rotations/mirrorings is tiled exactly and their probabilities
    are averaged in the image's frame; the same as averaging 8 single passes over the whole
    padded views (float64 network: only the final cast to float32 rounds)."""
    seg = make_segmenter(torch.float64)
    image = random_image(h, w, seed=4)
    averaged = seg.segment(image, tile_size=36, batch_size=5, probabilities=True, tta=8)
    total = np.zeros((1, h, w))
    for k in range(8):
        pixels = np.ascontiguousarray(view(image, k, (0, 1)))
        plan = seg.plan(pixels.shape[0], pixels.shape[1], 36)
        back = np.zeros((1, h, w))
        view(back, k, (1, 2))[...] = single_pass(seg, plan, pixels)
        total += back
    reference = total / 8
    assert averaged.probabilities.dtype == np.float32
    assert np.abs(averaged.probabilities - reference).max() <= FLOAT32_TOLERANCE
    decided = np.abs(reference[0] - 0.5) > FLOAT32_TOLERANCE
    assert np.array_equal(averaged.mask[decided], (reference[0] > 0.5)[decided])
    # The views really differ: averaging changed the result.
    single = seg.segment(image, tile_size=36, probabilities=True).probabilities
    assert h * w == 1 or np.abs(single - averaged.probabilities).max() > 1e-6
