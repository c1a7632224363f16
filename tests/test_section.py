"""Sections: huge images read from disk by window and written as tiled TIFFs band by band
give exactly the in-memory result (tiny real UNets, real EM slices, every TIFF layout);
stacks give one page per page; the service's batcher runs section pages unchanged; failures
leave no result file; memory is bounded by bands, counted in rows. (Refused inputs:
test_section_files.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from section_helpers import (
    LAYOUTS,
    LIMITS,
    TILE,
    assert_same,
    em,
    mosaic,
    seg,
    seg3,
    write_tiff,
)

from conftest import isbi_slice, read_volume
from unet_service.cli.stream import Cancelled, run_section, section_image
from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.errors import CorruptImageError, ImageTooLargeError
from unet_service.imaging.sources import open_source
from unet_service.imaging.tiff_writer import SectionWriter, WriterError, needs_bigtiff
from unet_service.pipeline.to_file import open_writer

__all__ = ["seg", "seg3"]  # module-scoped fixtures


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streamed_mask_equals_the_in_memory_mask(
    layout: str, seg: Segmenter, tmp_path: Path
) -> None:
    make, options = LAYOUTS[layout]
    image = make(em())
    path = write_tiff(tmp_path / "in.tif", [image], **options)
    with open_source(path, **LIMITS) as source:
        assert (source.pages, source.height, source.width) == (1, *image.shape)
        assert source.dtype == image.dtype
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE, batch_size=3)
    ref = seg.segment(image[:, :, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_streamed_probabilities_of_a_real_slice_and_several_classes(
    seg: Segmenter, seg3: Segmenter, tmp_path: Path
) -> None:
    slice_ = isbi_slice(2)
    for model, image in ((seg, slice_), (seg3, slice_[:200, :260])):
        path = write_tiff(tmp_path / "in.tif", [image], tile=(128, 128), compression="zlib")
        ref = model.segment(image[:, :, None], TILE, probabilities=True)
        for output in ("probabilities", "mask"):
            out = tmp_path / f"{model.out_channels}-{output}.tif"
            with open_source(path, **LIMITS) as source:
                run_section(model, source, out, output=output, tile_sizes=TILE)
            result = tifffile.imread(out)
            samples = (3,) if model is seg3 and output != "mask" else ()
            assert result.shape == image.shape + samples
            assert_same(result, ref, model, output)


def test_rgb_pages_become_luma_as_in_memory(seg: Segmenter, tmp_path: Path) -> None:
    rgb = np.stack([mosaic(300, 400, seed) for seed in range(3)], axis=-1)
    path = write_tiff(tmp_path / "rgb.tif", [rgb], photometric="rgb", tile=(64, 64))
    with open_source(path, **LIMITS) as source:
        assert source.channels == 3
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE)
    ref = seg.segment(rgb, TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_a_stack_gives_one_result_page_per_page_in_order(seg: Segmenter, tmp_path: Path) -> None:
    pages = [mosaic(200, 260, seed) for seed in range(3)]
    path = write_tiff(tmp_path / "stack.tif", pages, tile=(64, 64), compression="zlib")
    seen = []
    with open_source(path, **LIMITS) as source:
        assert source.pages == 3
        run_section(
            seg,
            source,
            tmp_path / "masks.tif",
            tile_sizes=(16, 32, TILE),  # the cheapest of the service's sizes, as in memory
            on_progress=lambda p: seen.append((p.tiles_done, p.tiles_total, p.pages_done)),
        )
    with tifffile.TiffFile(tmp_path / "masks.tif") as tif:
        assert len(tif.pages) == 3
        results = [page.asarray() for page in tif.pages]
    for page, result in zip(pages, results, strict=True):
        assert_same(
            result, seg.segment(page[:, :, None], (16, 32, TILE), probabilities=True), seg, "mask"
        )
    assert seen[-1][0] == seen[-1][1] and seen[-1][2] == 3
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)


def test_a_stacks_result_is_one_volume_imagej_opens_as_a_stack(
    seg: Segmenter, seg3: Segmenter, tmp_path: Path
) -> None:
    """tifffile.imread (scikit-image, napari) reads the whole (D, H, W) result, Fiji a stack
    of D slices. Several classes a pixel have no ImageJ hyperstack: one (D, H, W, K) series."""
    pages = [mosaic(120, 150, seed) for seed in range(3)]
    path = write_tiff(tmp_path / "stack.tif", pages, tile=(64, 64), compression="zlib")
    for model in (seg, seg3):
        refs = [model.segment(p[:, :, None], TILE, probabilities=True) for p in pages]
        for output in ("mask", "probabilities"):
            out = tmp_path / f"{model.out_channels}-{output}.tif"
            with open_source(path, **LIMITS) as source:
                run_section(model, source, out, output=output, tile_sizes=TILE)
            if model is seg3 and output == "probabilities":
                with tifffile.TiffFile(out) as tif:
                    assert not tif.is_imagej and len(tif.series) == 1
                volume = tifffile.imread(out)
                assert volume.shape == (3, 120, 150, 3)
            else:
                volume = read_volume(out)
                assert volume.shape == (3, 120, 150)
            for page, ref in zip(volume, refs, strict=True):
                assert_same(page, ref, model, output)


def test_output_is_tiled_compressed_and_bigtiff_only_when_needed(
    seg: Segmenter, tmp_path: Path
) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:300, :300]])
    for bigtiff in (None, True):
        out = tmp_path / f"{bigtiff}.tif"
        with open_source(path, **LIMITS) as source:
            run_section(seg, source, out, tile_sizes=TILE, bigtiff=bigtiff)
        with tifffile.TiffFile(out) as tif:
            page = tif.pages[0]
            assert page.is_tiled and page.tile == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert tif.is_bigtiff == bool(bigtiff)
    assert needs_bigtiff(1, 100_000, 100_000, 1, np.dtype(np.uint8))
    assert not needs_bigtiff(1, 20_000, 20_000, 1, np.dtype(np.uint8))


def test_other_formats_are_decoded_whole_under_their_own_limit(
    seg: Segmenter, tmp_path: Path
) -> None:
    path = tmp_path / "slice.png"
    Image.fromarray(em()[:200, :300]).save(path)
    with pytest.raises(ImageTooLargeError):
        open_source(path, **LIMITS, max_decoded_pixels=200 * 299)
    with open_source(path, **LIMITS, max_decoded_pixels=200 * 300) as source:
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE)
    ref = seg.segment(em()[:200, :300, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_test_time_augmentation_is_refused_for_sections(seg: Segmenter, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:64, :64]])
    with open_source(path, **LIMITS) as source, open_writer(tmp_path / "o.tif", source, 1) as w:
        with pytest.raises(ValueError, match="test-time augmentation"):
            section_image(seg, source, 0, w, TILE, tta=8)
        w.abort()


# ----- failures leave nothing; memory is bands --------------------------------------------------


def test_a_corrupt_tile_mid_way_leaves_no_result_file(seg: Segmenter, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:400, :400]], tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[30], page.databytecounts[30]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # not a zlib stream any more
    path.write_bytes(bytes(data))
    out = tmp_path / "mask.tif"
    with open_source(path, **LIMITS) as source, pytest.raises(CorruptImageError):
        run_section(seg, source, out, tile_sizes=TILE)
    assert not out.exists()


def test_cancelling_leaves_no_result_file(seg: Segmenter, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:300, :300]] * 2)
    out = tmp_path / "mask.tif"
    batches = []
    with open_source(path, **LIMITS) as source, pytest.raises(Cancelled):
        run_section(
            seg,
            source,
            out,
            tile_sizes=TILE,
            cancelled=lambda: len(batches) > 3,
            on_progress=batches.append,
        )
    assert not out.exists()


def test_writer_refuses_to_finish_an_incomplete_file(tmp_path: Path) -> None:
    out = tmp_path / "part.tif"
    writer = SectionWriter(out, pages=2, height=10, width=7, dtype=np.uint8)
    writer.write_rows(np.zeros((10, 7), np.uint8))
    with pytest.raises(WriterError, match="only 10 of 20"):
        writer.close()
    assert not out.exists()
    with (
        pytest.raises(ValueError, match="more rows"),
        SectionWriter(out, pages=1, height=4, width=7, dtype=np.uint8) as writer,
    ):
        writer.write_rows(np.zeros((5, 7), np.uint8))
    assert not out.exists()


def test_streaming_holds_a_few_bands_not_the_image(seg: Segmenter, tmp_path: Path) -> None:
    """A tall page: the stitching side holds at most two tile rows of output, the source's
    cache one band of input chunk rows, and the writer, given a backlog of one row, the
    bands of one batch plus a TIFF tile's rows: memory follows the width, not the height."""
    image = mosaic(1500, 120)
    path = write_tiff(tmp_path / "tall.tif", [image], tile=(32, 32), compression="zlib")
    with open_source(path, **LIMITS) as source:
        writer = SectionWriter(
            tmp_path / "mask.tif",
            pages=1,
            height=1500,
            width=120,
            dtype=np.uint8,
            tile=32,
            backlog_rows=1,
        )
        with writer:
            sizes = []
            for page in range(source.pages):
                image_ = section_image(seg, source, page, writer, TILE)
                run_tiles(image_, BatchRunner(seg, 4), sizes.append)
        band, window = image_.plan.tile_size, image_.plan.input_size
        assert image_.sink.max_rows_held <= 2 * band
        assert source.max_cached_rows <= window + 2 * 32
        # The writer: the bands one batch completes (two here: 4 tiles, 2 a row) waiting, and
        # the previous batch's still being compressed (the writer thread may lag a batch
        # behind; the next batch's tiles wait for it), plus one TIFF tile's rows.
        assert writer.max_buffered_rows <= 2 * 2 * band + 32 < 1500
    ref = seg.segment(image[:, :, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_a_stack_is_written_in_one_series_holding_bands_not_pages(
    seg: Segmenter, tmp_path: Path
) -> None:
    """All pages go through one `TiffWriter.write` (one series): the writer still holds a
    few bands at a time, never a page."""
    pages = [mosaic(900, 120, seed) for seed in range(3)]
    path = write_tiff(tmp_path / "tall.tif", pages, tile=(32, 32), compression="zlib")
    with open_source(path, **LIMITS) as source:
        writer = SectionWriter(
            tmp_path / "masks.tif",
            pages=3,
            height=900,
            width=120,
            dtype=np.uint8,
            tile=32,
            backlog_rows=1,
        )
        with writer:
            for page in range(source.pages):
                run_tiles(section_image(seg, source, page, writer, TILE), BatchRunner(seg, 4))
    band = seg.plan(900, 120, TILE).tile_size
    assert writer.max_buffered_rows <= 2 * 2 * band + 32 < 900  # as for one tall page
    masks = read_volume(tmp_path / "masks.tif")
    for page, mask in zip(pages, masks, strict=True):
        assert_same(mask, seg.segment(page[:, :, None], TILE, probabilities=True), seg, "mask")


@pytest.mark.anyio
async def test_the_service_batcher_runs_section_pages_unchanged(
    seg: Segmenter, tmp_path: Path
) -> None:
    """The job runner's way: each page a SectionImage in the service's TileBatcher, beside
    an ordinary in-memory image sharing its batches."""
    from unet_service.serving.batcher import TileBatcher

    pages = [mosaic(150, 230, seed) for seed in range(2)]
    path = write_tiff(tmp_path / "stack.tif", pages, tile=(32, 32), compression="zlib")
    batcher = TileBatcher(BatchRunner(seg, 4), lambda: 4, max_wait_s=0.005, max_queue_tiles=999)
    batcher.start()
    try:
        with (
            open_source(path, **LIMITS) as source,
            open_writer(tmp_path / "masks.tif", source, seg.out_channels) as writer,
        ):
            for page in range(source.pages):
                section = section_image(seg, source, page, writer, TILE)
                other = batcher.submit(seg.tiled(pages[0][:50, :60, None], TILE))
                job = batcher.submit(section)  # type: ignore[arg-type]
                assert (await batcher.result(job, 600)).page == page
                await batcher.result(other, 600)
    finally:
        await batcher.stop()
    with tifffile.TiffFile(tmp_path / "masks.tif") as tif:
        results = [p.asarray() for p in tif.pages]
    for page, result in zip(pages, results, strict=True):
        assert_same(result, seg.segment(page[:, :, None], TILE, probabilities=True), seg, "mask")
