"""OME-Zarr results computed block by block, in process with the tiny real UNet on real EM
volumes written by ome-zarr: equal to the whole image's result at any block size (a block
smaller than the network's context included, odd volume sizes), resumed block by block, cell
ids joined across block borders, and stores that ome-zarr's reader (napari's) opens with the
right axes, scales and labels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import TILE, save_tiny
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from zarr_helpers import (
    SCALE,
    UNIT,
    blockwise,
    em_volume,
    level,
    thread_compute,
    whole_image,
    write_ome_zarr,
)

from unet_service.core.engine import Segmenter
from unet_service.imaging.sources import open_source
from unet_service.pipeline.blocks import BlockJob
from unet_service.pipeline.to_file import Progress
from unet_service.pipeline.to_store import create_results, plan_volume, segment_to_store

# 3 x 101 x 77: odd sizes, and chunks of 8 whose blocks cut tiles (output 60, stride 60)
# anywhere. The tiny UNet's context is 20 pixels each side (its input tile 100).
SHAPE = (3, 101, 77)
CONTEXT = 20


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    weights = save_tiny(tmp_path_factory.mktemp("zarr-blocks"))
    return Segmenter.from_weights(weights, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return em_volume(*SHAPE)


@pytest.fixture(scope="module")
def reference(seg: Segmenter, volume: np.ndarray):
    return whole_image(seg, volume)


def assert_equals_whole(mask: np.ndarray, probs: np.ndarray, reference) -> None:
    """Masks byte-equal (each tile has the whole run's input and is computed alone, so the
    same bits); probabilities within docs/inference.md's fp32 bound."""
    for page, expected in enumerate(reference):
        assert np.array_equal(mask[page], expected.mask), page
        assert np.abs(probs[page] - expected.probabilities[0]).max() <= 1e-5, page


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("side", [16, 40, 72, 2048])
def test_any_block_size_gives_the_whole_image_result(
    seg: Segmenter, volume: np.ndarray, reference, tmp_path: Path, version: str, side: int
) -> None:
    source = write_ome_zarr(tmp_path / "in.zarr", volume, version=version, chunks=(1, 8, 8))
    outputs = {"mask": str(tmp_path / "mask.zarr"), "probabilities": str(tmp_path / "p.zarr")}
    results, counts, progress = blockwise(seg, source, outputs, side)
    block = results["mask"].info["layout"]["block"]
    assert block[1] == min(side, 104) and block[2] == min(side, 80)  # whole chunks of 8
    if side == 16:
        assert side < CONTEXT and counts.total == 3 * 7 * 5
    assert counts.skipped == 0 and progress.tiles_done == progress.tiles_total
    assert_equals_whole(level(outputs["mask"]), level(outputs["probabilities"]), reference)
    for result in results.values():  # the store's chunks are the input's
        assert result.levels[0].chunks == (1, 8, 8)
        assert result.spec.zarr_format == (2 if version == "0.4" else 3)


def test_a_block_run_stopped_midway_resumes_with_the_unwritten_blocks(
    seg: Segmenter, volume: np.ndarray, reference, tmp_path: Path
) -> None:
    source = write_ome_zarr(tmp_path / "in.zarr", volume, version="0.5", chunks=(1, 32, 32))
    outputs = {"mask": str(tmp_path / "mask.zarr"), "probabilities": str(tmp_path / "p.zarr")}
    compute, entries = thread_compute(seg), []

    async def stops_after_five(entry):
        entries.append(entry)
        if len(entries) > 5:
            raise RuntimeError("the server went away")
        return await compute(entry)

    with pytest.raises(RuntimeError, match="went away"):
        blockwise(seg, source, outputs, 32, compute=stops_after_five)
    total = 3 * 4 * 3
    results, counts, progress = blockwise(seg, source, outputs, 32, tag=2, resume=True)
    results_tags = {output: r.block_tags() for output, r in results.items()}
    first = results_tags["mask"]
    # Five blocks were written by the first run and kept; only the others were computed.
    assert (counts.total, counts.skipped, counts.computed) == (total, 5, total - 5)
    assert np.count_nonzero(first == 1) == 5 and np.count_nonzero(first == 2) == total - 5
    assert np.array_equal(results_tags["probabilities"], first)
    assert progress.resumed_tiles > 0 and progress.tiles_done == progress.tiles_total
    assert_equals_whole(level(outputs["mask"]), level(outputs["probabilities"]), reference)


def test_cell_ids_are_unique_and_joined_across_block_borders(
    seg: Segmenter, tmp_path: Path
) -> None:
    pages = em_volume(2, 301, 203)
    source = write_ome_zarr(tmp_path / "in.zarr", pages, version="0.4", chunks=(1, 32, 32))
    outputs = {"instances": str(tmp_path / "ids.zarr")}
    _, counts, _ = blockwise(seg, source, outputs, 64)
    assert counts.total == 2 * 5 * 4
    ids = level(outputs["instances"])
    assert ids.dtype == np.uint32
    # Unique over the volume: no id on two pages, and numbered 1..N without gaps.
    found = [set(np.unique(page)) - {0} for page in ids]
    assert not found[0] & found[1]
    assert set().union(*found) == set(range(1, ids.max() + 1))
    whole = [seg.instances(r.probabilities) for r in whole_image(seg, pages)]
    assert abs(int(ids.max()) - sum(int(w.max()) for w in whole)) <= 0.02 * ids.max()
    # The whole image's cells that cross a block border: each is one id in the block result
    # (the block-local watershed would give it one id per block it touches).
    crossing, kept = 0, 0
    for page, cells in zip(ids, whole, strict=True):
        for cell in range(1, int(cells.max()) + 1):
            rows, cols = np.nonzero(cells == cell)
            if len(rows) < 30 or len(set(zip(rows // 64, cols // 64, strict=True))) < 2:
                continue
            crossing += 1
            _, counts_ = np.unique(page[rows, cols], return_counts=True)
            kept += counts_.max() >= 0.9 * len(rows)
    assert crossing >= 50
    assert kept >= 0.95 * crossing, (kept, crossing)


def test_ome_zarr_reads_the_results_with_their_axes_scales_and_labels(
    seg: Segmenter, tmp_path: Path
) -> None:
    pages = em_volume(2, 301, 203)
    source = write_ome_zarr(tmp_path / "in.zarr", pages, version="0.5", chunks=(1, 64, 64))
    outputs = {o: str(tmp_path / f"{o}.zarr") for o in ("mask", "probabilities", "instances")}
    blockwise(seg, source, outputs, 128)
    for output, location in outputs.items():
        (node, *_) = Reader(parse_url(location))()
        meta = node.metadata
        assert meta["axes"] == [{"name": a, "type": "space", "unit": UNIT} for a in "zyx"]
        scales = [t[0]["scale"] for t in meta["coordinateTransformations"]]
        assert scales == [[SCALE[0], SCALE[1] * 2**k, SCALE[2] * 2**k] for k in range(2)]
        assert [d.shape for d in node.data] == [(2, 301, 203), (2, 151, 102)]
        full, half = (np.asarray(d) for d in node.data)
        if output == "probabilities":
            assert node.load(Label) is None and full.dtype == np.float32
            corner = full[:, :2, :2].mean(axis=(1, 2), dtype=np.float64)
            assert np.allclose(half[:, 0, 0], corner, atol=1e-6)
        else:
            assert node.load(Label) is not None
            assert np.array_equal(half, full[:, ::2, ::2])  # nearest: ids stay ids
        if output == "mask":
            assert meta["properties"] == {1: {"class": seg.card.class_names[0]}}
            assert set(np.unique(full)) == {0, 1}


def test_several_classes_are_a_c_axis_of_probabilities(tmp_path: Path) -> None:
    weights = save_tiny(tmp_path, out_channels=3, name="three")
    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    pages = em_volume(1, 90, 70)[0]  # one y, x plane
    source = write_ome_zarr(tmp_path / "in.zarr", pages, version="0.4", axes="yx", chunks=(32, 32))
    outputs = {"probabilities": str(tmp_path / "p.zarr"), "mask": str(tmp_path / "m.zarr")}
    blockwise(seg, source, outputs, 32)
    (node, *_) = Reader(parse_url(outputs["probabilities"]))()
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "y", "x"]
    probs = np.asarray(node.data[0])
    expected = seg.segment(pages[:, :, None], TILE, batch_size=1, probabilities=True)
    assert probs.shape == (3, 90, 70) and np.abs(probs - expected.probabilities).max() <= 1e-5
    assert np.array_equal(level(outputs["mask"]), expected.mask)
    (labels, *_) = Reader(parse_url(outputs["mask"]))()
    assert labels.metadata["properties"] == {k: {"class": f"class{k}"} for k in range(3)}


def test_a_tiff_stack_becomes_an_ome_zarr_result(seg: Segmenter, tmp_path: Path) -> None:
    pages = em_volume(2, 90, 70)
    tifffile.imwrite(tmp_path / "stack.tif", pages)
    source = open_source(tmp_path / "stack.tif", max_pixels=10**8, max_pages=10)
    recipe = seg.recipe(TILE)
    volume = plan_volume(source, recipe, ("mask",), 2048)
    results = create_results({"mask": str(tmp_path / "m.zarr")}, source, recipe, volume, {})
    job = BlockJob(volume, source, recipe, results)
    asyncio.run(
        segment_to_store(
            job, compute=thread_compute(seg), progress=Progress(), name="stack", class_names=["c"]
        )
    )
    (node, *_) = Reader(parse_url(str(tmp_path / "m.zarr")))()
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert results["mask"].spec.zarr_format == 3 and results["mask"].levels[0].chunks == (1, 90, 70)
    expected = whole_image(seg, pages)
    assert np.array_equal(np.asarray(node.data[0]), np.stack([e.mask for e in expected]))
