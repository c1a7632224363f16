"""Sections: huge images read from disk by window and written as tiled TIFFs band by band
give exactly the in-memory result (tiny real UNets, real EM slices); lying, truncated or
mismatched TIFFs are refused from their headers; failures leave no result file; memory is
bounded by bands, counted in rows."""

from __future__ import annotations

import functools
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import TILE, save_tiny
from PIL import Image

from conftest import isbi_slice
from model.engine import Segmenter
from model.imageio import CorruptImageError, ImageError, ImageTooLargeError
from model.runner import BatchRunner, run_tiles
from model.section import Cancelled, open_writer, run_section, section_image
from model.section_source import StackMismatchError, TooManyPagesError, open_section
from model.section_writer import SectionWriter, WriterError, needs_bigtiff
from model.tiled_image import Segmentation

LIMITS = {"max_pixels": 10**8, "max_pages": 16}
TOLERANCE = 1e-5  # README, Precision: tiled vs whole, fp32


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return Segmenter.from_weights(
        save_tiny(tmp_path_factory.mktemp("tiny")), device="cpu", backend="torch"
    )


@pytest.fixture(scope="module")
def seg3(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    weights = save_tiny(tmp_path_factory.mktemp("tiny3"), out_channels=3, name="tiny3")
    return Segmenter.from_weights(weights, device="cpu", backend="torch")


def mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W) uint8 of real EM slices, mirrored so that neighbours meet at their edges."""
    rows = []
    for i in range(-(-height // 512)):
        row = []
        for j in range(-(-width // 512)):
            block = isbi_slice((seed + 3 * i + j) % 4)
            row.append(block[::-1] if i % 2 else block)
            row[-1] = row[-1][:, ::-1] if j % 2 else row[-1]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows)[:height, :width])


def assert_same(out: np.ndarray, ref: Segmentation, seg: Segmenter, output: str) -> None:
    """A streamed page equals the in-memory result: probabilities within TOLERANCE, masks
    identical wherever the decision is more than TOLERANCE from a tie."""
    assert ref.probabilities is not None
    probs = ref.probabilities
    if output == "probabilities":
        streamed = out if out.ndim == 3 else out[..., None]
        assert streamed.dtype == np.float32
        assert np.abs(streamed.transpose(2, 0, 1) - probs).max() <= TOLERANCE
        return
    assert out.dtype == np.uint8
    if seg.out_channels == 1:
        clear = np.abs(probs[0] - seg.card.threshold) > TOLERANCE
        expected = ref.mask * np.uint8(255)  # the service's mask values
        assert set(np.unique(out)) <= {0, 255}
    else:
        top2 = np.sort(probs, axis=0)[-2:]
        clear = top2[1] - top2[0] > TOLERANCE
        expected = ref.mask
    assert clear.mean() > 0.99
    assert np.array_equal(out[clear], expected[clear])


def write_tiff(path: Path, pages: list[np.ndarray], **options: object) -> Path:
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, metadata=None, **options)
    return path


@functools.cache
def em() -> np.ndarray:
    """A 700 x 1100 EM mosaic (read when first needed: without the data, tests skip)."""
    return mosaic(700, 1100)


# Pixel type, layout and compression: the image (from the mosaic) and tifffile's options.
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], dict]] = {
    "tiled-deflate-8bit": (lambda a: a, {"tile": (128, 96), "compression": "zlib"}),
    "strips-lzw-16bit": (
        lambda a: a.astype(np.uint16) * 257 + np.uint16(77),
        {"rowsperstrip": 9, "compression": "lzw"},
    ),
    "one-raw-strip-8bit": (lambda a: a, {"rowsperstrip": 700}),
    "tiled-raw-16bit": (lambda a: a.astype(np.uint16) * 250, {"tile": (64, 64)}),
    "strips-zstd-float": (
        lambda a: a.astype(np.float32) / 255,
        {"rowsperstrip": 16, "compression": "zstd"},
    ),
    "tiny-image": (lambda a: a[:37, :23], {}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streamed_mask_equals_the_in_memory_mask(
    layout: str, seg: Segmenter, tmp_path: Path
) -> None:
    make, options = LAYOUTS[layout]
    image = make(em())
    path = write_tiff(tmp_path / "in.tif", [image], **options)
    with open_section(path, **LIMITS) as source:
        assert (source.pages, source.height, source.width) == (1, *image.shape)
        assert source.dtype == image.dtype
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE, batch_size=3)
    ref = seg.segment(image[:, :, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_streamed_probabilities_of_a_real_slice_and_several_classes(
    seg: Segmenter, seg3: Segmenter, tmp_path: Path
) -> None:
    image = isbi_slice(2)
    path = write_tiff(tmp_path / "in.tif", [image], tile=(256, 256), compression="zlib")
    for model in (seg, seg3):
        ref = model.segment(image[:, :, None], TILE, probabilities=True)
        for output in ("probabilities", "mask"):
            out = tmp_path / f"{model.out_channels}-{output}.tif"
            with open_section(path, **LIMITS) as source:
                run_section(model, source, out, output=output, tile_sizes=TILE)
            result = tifffile.imread(out)
            expected_shape = (512, 512, 3) if model is seg3 and output != "mask" else (512, 512)
            assert result.shape == expected_shape
            assert_same(result, ref, model, output)


def test_rgb_pages_become_luma_as_in_memory(seg: Segmenter, tmp_path: Path) -> None:
    rgb = np.stack([mosaic(300, 400, seed) for seed in range(3)], axis=-1)
    path = write_tiff(tmp_path / "rgb.tif", [rgb], photometric="rgb", tile=(64, 64))
    with open_section(path, **LIMITS) as source:
        assert source.channels == 3
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE)
    ref = seg.segment(rgb, TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_a_stack_gives_one_result_page_per_page_in_order(seg: Segmenter, tmp_path: Path) -> None:
    pages = [mosaic(200, 260, seed) for seed in range(3)]
    path = write_tiff(tmp_path / "stack.tif", pages, tile=(64, 64), compression="zlib")
    seen = []
    with open_section(path, **LIMITS) as source:
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


def test_output_is_tiled_compressed_and_bigtiff_only_when_needed(
    seg: Segmenter, tmp_path: Path
) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:300, :300]])
    for bigtiff in (None, True):
        out = tmp_path / f"{bigtiff}.tif"
        with open_section(path, **LIMITS) as source:
            run_section(seg, source, out, tile_sizes=TILE, bigtiff=bigtiff)
        with tifffile.TiffFile(out) as tif:
            page = tif.pages[0]
            assert page.is_tiled and page.tile == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert tif.is_bigtiff == bool(bigtiff)
    assert needs_bigtiff(1, 100_000, 100_000, 1, np.dtype(np.uint8))
    assert not needs_bigtiff(1, 20_000, 20_000, 1, np.dtype(np.uint8))


# ----- refused from the headers ---------------------------------------------------------------


def test_pages_of_different_sizes_are_refused(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "mixed.tif", [em()[:64, :64], em()[:64, :64], em()[:64, :50]])
    with pytest.raises(StackMismatchError, match=r"page 3 is 50x64 uint8, page 1 is 64x64"):
        open_section(path, **LIMITS)


def test_more_pages_than_allowed_are_refused_after_walking_only_that_many(
    tmp_path: Path,
) -> None:
    path = write_tiff(tmp_path / "many.tif", [em()[:8, :8]] * 40)
    assert open_section(path, max_pixels=10**6, max_pages=40).pages == 40
    with pytest.raises(TooManyPagesError, match="more than 10 pages"):
        open_section(path, max_pixels=10**6, max_pages=10)


def test_an_endless_ifd_chain_is_refused_without_large_allocation(tmp_path: Path) -> None:
    """One IFD whose next-IFD offset points to itself: a chain claiming infinitely many
    pages. Walking stops at max_pages (or at tifffile's cycle check), in bounded memory."""
    path = write_tiff(tmp_path / "loop.tif", [em()[:8, :8]])
    data = bytearray(path.read_bytes())
    first_ifd = struct.unpack_from("<I", data, 4)[0]
    tags = struct.unpack_from("<H", data, first_ifd)[0]
    struct.pack_into("<I", data, first_ifd + 2 + 12 * tags, first_ifd)
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        for max_pages in (5, 10_000):
            try:
                pages = open_section(path, max_pixels=10**9, max_pages=max_pages).pages
            except TooManyPagesError:
                continue
            assert pages <= max_pages
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_page_counts_claimed_in_metadata_are_not_trusted(tmp_path: Path) -> None:
    """ImageJ's and tifffile's descriptions may claim 10^6 images; only IFDs count."""
    for description in (
        "ImageJ=1.11a\nimages=1000000\nslices=1000000\n",
        '{"shape": [1000000, 32, 32]}',
    ):
        path = tmp_path / "claims.tif"
        tifffile.imwrite(path, em()[:32, :32], description=description, metadata=None)
        with open_section(path, **LIMITS) as source:
            assert source.pages == 1


def patch_size(path: Path, height: int, width: int) -> None:
    """Overwrite the first page's ImageLength and ImageWidth (LONG values) in place."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        at = {code: tags[code].valueoffset for code in (256, 257)}
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, at[256], width)
    struct.pack_into("<I", data, at[257], height)
    path.write_bytes(bytes(data))


def test_a_header_claiming_a_huge_page_is_refused_before_any_pixel(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "huge.tif", [em()[:64, :64]], tile=(16, 16), compression="zlib")
    patch_size(path, 1_000_000, 1_000_000)
    with pytest.raises(ImageTooLargeError, match="1000000x1000000"):
        open_section(path, **LIMITS)
    # Admitted by the pixel limit, the page still lists far fewer tiles than it claims.
    with pytest.raises(CorruptImageError, match="tiles, its size needs"):
        open_section(path, max_pixels=10**12, max_pages=1)


@pytest.mark.parametrize("options", [{"tile": (64, 64), "compression": "zlib"}, {}])
def test_a_truncated_tiff_is_refused_before_inference(options: dict, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "cut.tif", [em()[:300, :300]], **options)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptImageError, match="truncated"):
        open_section(path, **LIMITS)


def test_huge_compressed_chunks_are_refused_with_advice(tmp_path: Path) -> None:
    path = write_tiff(
        tmp_path / "strip.tif", [em()[:300, :300]], rowsperstrip=300, compression="zlib"
    )
    with pytest.raises(ImageError, match="tiled TIFF"):
        open_section(path, **LIMITS, max_chunk_bytes=64 * 300)
    # Uncompressed, the same single strip is read by offset, a slice of rows at a time.
    raw = write_tiff(tmp_path / "raw.tif", [em()[:300, :300]], rowsperstrip=300)
    with open_section(raw, **LIMITS, max_chunk_bytes=64 * 300) as source:
        assert np.array_equal(source.read(0, 100, 200, 5, 9)[..., 0], em()[100:200, 5:9])


def test_other_formats_are_decoded_whole_under_their_own_limit(
    seg: Segmenter, tmp_path: Path
) -> None:
    path = tmp_path / "slice.png"
    Image.fromarray(em()[:200, :300]).save(path)
    with pytest.raises(ImageTooLargeError):
        open_section(path, **LIMITS, max_decoded_pixels=200 * 299)
    with open_section(path, **LIMITS, max_decoded_pixels=200 * 300) as source:
        run_section(seg, source, tmp_path / "mask.tif", tile_sizes=TILE)
    ref = seg.segment(em()[:200, :300, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")


def test_test_time_augmentation_is_refused_for_sections(seg: Segmenter, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:64, :64]])
    with open_section(path, **LIMITS) as source, open_writer(tmp_path / "o.tif", source, 1) as w:
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
    with open_section(path, **LIMITS) as source, pytest.raises(CorruptImageError):
        run_section(seg, source, out, tile_sizes=TILE)
    assert not out.exists()


def test_cancelling_leaves_no_result_file(seg: Segmenter, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "in.tif", [em()[:300, :300]] * 2)
    out = tmp_path / "mask.tif"
    batches = []
    with open_section(path, **LIMITS) as source, pytest.raises(Cancelled):
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
    with open_section(path, **LIMITS) as source:
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
        assert image_.max_rows_held <= 2 * band
        assert source.max_cached_rows <= window + 2 * 32
        assert writer.max_buffered_rows <= 2 * band + 32
    ref = seg.segment(image[:, :, None], TILE, probabilities=True)
    assert_same(tifffile.imread(tmp_path / "mask.tif"), ref, seg, "mask")
