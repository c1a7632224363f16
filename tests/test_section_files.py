"""Section inputs refused from their headers, before any pixel is decoded or any result
written: mismatched stacks, page counts beyond the limit (claimed by an endless IFD chain or
by metadata), huge claimed sizes, truncated data, chunks too large to read by window; and
`unet-predict --stream`."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from section_helpers import LIMITS, assert_same, em, write_tiff

from conftest import read_volume
from unet_service.imaging import tiff_layout
from unet_service.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    StackMismatchError,
    TooManyPagesError,
)
from unet_service.imaging.sources import open_source


def test_pages_of_different_sizes_are_refused(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "mixed.tif", [em()[:64, :64], em()[:64, :64], em()[:64, :50]])
    with pytest.raises(StackMismatchError, match=r"page 3 is 50x64 but page 1 is 64x64"):
        open_source(path, **LIMITS)


def test_more_pages_than_allowed_are_refused_after_walking_only_that_many(
    tmp_path: Path,
) -> None:
    path = write_tiff(tmp_path / "many.tif", [em()[:8, :8]] * 40)
    assert open_source(path, max_pixels=10**6, max_pages=40).pages == 40
    with pytest.raises(TooManyPagesError, match="more than the limit of 10 pages"):
        open_source(path, max_pixels=10**6, max_pages=10)


def test_an_endless_ifd_chain_is_refused_without_large_allocation(tmp_path: Path) -> None:
    """One IFD whose next-IFD offset points to itself: a chain claiming infinitely many
    pages. It is corrupt, not a stack of max_pages pages (the verdict of imaging.pages too),
    and found at the first repeat, in bounded memory."""
    path = write_tiff(tmp_path / "loop.tif", [em()[:8, :8]])
    data = bytearray(path.read_bytes())
    first_ifd = struct.unpack_from("<I", data, 4)[0]
    tags = struct.unpack_from("<H", data, first_ifd)[0]
    struct.pack_into("<I", data, first_ifd + 2 + 12 * tags, first_ifd)
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        for max_pages in (5, 300):
            with pytest.raises(CorruptImageError, match="loops at page 2"):
                open_source(path, max_pixels=10**9, max_pages=max_pages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_page_counts_claimed_in_metadata_are_checked_not_trusted(tmp_path: Path) -> None:
    """ImageJ's description may claim 10^6 images: refused at once as more pages than the
    limit (as a synchronous stack is, imaging.pages), and never allocated or walked for; a
    claim in tifffile's own description is not a page count, only IFDs are."""
    path = tmp_path / "claims.tif"
    tifffile.imwrite(
        path,
        em()[:32, :32],
        description="ImageJ=1.11a\nimages=1000000\nslices=1000000\n",
        metadata=None,
    )
    with pytest.raises(TooManyPagesError, match="declares 1000000 pages"):
        open_source(path, **LIMITS)
    tifffile.imwrite(
        path, em()[:32, :32], description='{"shape": [1000000, 32, 32]}', metadata=None
    )
    with open_source(path, **LIMITS) as source:
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
        open_source(path, **LIMITS)
    # Admitted by the pixel limit, the page still lists far fewer tiles than it claims.
    with pytest.raises(CorruptImageError, match="tiles, its size needs"):
        open_source(path, max_pixels=10**12, max_pages=1)


@pytest.mark.parametrize("options", [{"tile": (64, 64), "compression": "zlib"}, {}])
def test_a_truncated_tiff_is_refused_before_inference(options: dict, tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "cut.tif", [em()[:300, :300]], **options)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptImageError, match="truncated"):
        open_source(path, **LIMITS)


def test_huge_compressed_chunks_are_refused_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiff(
        tmp_path / "strip.tif", [em()[:300, :300]], rowsperstrip=300, compression="zlib"
    )
    # Refused where the page is larger than a request may decode whole ...
    with pytest.raises(ImageError, match="tiled TIFF"):
        open_source(path, **LIMITS, max_chunk_bytes=64 * 300, max_decoded_pixels=300 * 299)
    # ... and read, as a request would read it, where it is not: one file, one verdict.
    with open_source(path, **LIMITS, max_chunk_bytes=64 * 300, max_decoded_pixels=300 * 300) as s:
        assert np.array_equal(s.read(0, 0, 300, 0, 300)[..., 0], em()[:300, :300])
    # Uncompressed, the same single strip is read by offset, a slice of rows at a time.
    monkeypatch.setattr(tiff_layout, "RAW_ROW_BYTES", 64 * 300)
    raw = write_tiff(tmp_path / "raw.tif", [em()[:300, :300]], rowsperstrip=300)
    with open_source(raw, **LIMITS, max_chunk_bytes=64 * 300) as source:
        assert np.array_equal(source.read(0, 100, 200, 5, 9)[..., 0], em()[100:200, 5:9])
        assert source.max_cached_rows <= 100 + 2 * 64  # slices of 64 rows, not the strip
        assert np.array_equal(source.read(0, 0, 300, 0, 300)[..., 0], em()[:300, :300])


def test_unet_predict_streams_huge_tiffs_with_one_line_errors(
    tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unet_service.cli.predict import main
    from unet_service.core.engine import Segmenter

    (tmp_path / "in").mkdir()
    good = write_tiff(tmp_path / "in" / "good.tif", [em()[:200, :300]] * 2, tile=(64, 64))
    cut = write_tiff(tmp_path / "in" / "cut.tif", [em()[:200, :300]], tile=(64, 64))
    cut.write_bytes(cut.read_bytes()[:20000])
    out = tmp_path / "out"
    argv = ["--stream", "-o", str(out), "--weights", str(tiny_weights), "--tile-size", "60"]
    assert main([str(cut), str(good), *argv]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"unet-predict: error: {cut}: ")
    assert "truncated" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["good.tif"]
    seg = Segmenter.from_weights(tiny_weights, device="cpu")
    with tifffile.TiffFile(out / "good.tif") as tif:
        assert len(tif.pages) == 2 and tif.pages[0].is_tiled
        mask = tif.pages[1].asarray()
    ref = seg.segment(em()[:200, :300, None], 60, probabilities=True)
    clear = np.abs(ref.probabilities[0] - seg.card.threshold) > 1e-5
    assert np.array_equal(mask[clear], ref.mask[clear] * 255)


def test_unet_predict_streams_a_stack_into_one_imagej_volume(
    tiny_weights: Path, tmp_path: Path
) -> None:
    from unet_service.cli.predict import main
    from unet_service.core.engine import Segmenter

    pages = [em()[:200, :300], em()[100:300, 50:350]]
    stack = write_tiff(tmp_path / "stack.tif", pages, tile=(64, 64), compression="zlib")
    out = tmp_path / "out"
    argv = ["--stream", "-o", str(out), "--weights", str(tiny_weights), "--tile-size", "60"]
    assert main([str(stack), *argv]) == 0
    assert main([str(stack), *argv, "--probabilities"]) == 0
    masks = read_volume(out / "stack.tif")
    probs = read_volume(out / "stack.probabilities.tif")
    assert masks.shape == probs.shape == (2, 200, 300)
    seg = Segmenter.from_weights(tiny_weights, device="cpu")
    for page, mask, prob in zip(pages, masks, probs, strict=True):
        ref = seg.segment(page[:, :, None], 60, probabilities=True)
        assert_same(mask, ref, seg, "mask")
        assert_same(prob, ref, seg, "probabilities")


def test_a_decompression_bomb_in_one_tile_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """A 64 x 64 tile whose deflate stream holds 32 MiB: refused when read, without ever
    holding more than about twice the tile."""
    good = zlib.compress(np.zeros((64, 64), np.uint8).tobytes())
    bomb = zlib.compress(bytes(32 << 20), 9)
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(
        path,
        iter([good, bomb]),
        shape=(64, 128),
        dtype=np.uint8,
        tile=(64, 64),
        compression="zlib",
        metadata=None,
    )
    del bomb
    with open_source(path, **LIMITS) as source:
        assert source.read(0, 0, 64, 0, 64).max() == 0
        tracemalloc.start()
        try:
            with pytest.raises(CorruptImageError, match="decompresses to more than"):
                source.read(0, 0, 64, 60, 70)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20
