"""imaging.tiff_volume, the one writer of TIFF files: every volume is one (D, H, W[, S]) series
read back whole by tifffile.imread with an ImageJ hyperstack description (its pages the
slices), for each pixel type written (32-bit cell ids too, exact), in strips or in tiles
from an iterator, classic or BigTIFF; several classes per pixel are one series without
ImageJ metadata (ImageJ has no hyperstack for them)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import tifffile

from conftest import read_volume
from unet_service.imaging.tiff_volume import (
    Volume,
    labels_bytes,
    labels_dtype,
    open_volume,
    volume_bytes,
    write_volume,
)

RNG = np.random.default_rng(0)


def tiles_of(volume: np.ndarray, tile: int):
    """A volume's tiles as write_volume takes them from an iterator."""
    for page in volume:
        for top in range(0, page.shape[0], tile):
            for left in range(0, page.shape[1], tile):
                yield page[top : top + tile, left : left + tile]


def written(volume: np.ndarray, layout: Volume, **options: object) -> bytes:
    buf = io.BytesIO()
    bigtiff = bool(options.pop("bigtiff", False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. tifffile's "nonconformant BigTIFF ImageJ"
        with open_volume(buf, layout, bigtiff) as tif:
            data = tiles_of(volume, 64) if options.get("tile") else volume
            write_volume(tif, data, layout, **options)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
@pytest.mark.parametrize("options", [{}, {"tile": 64}, {"tile": 64, "bigtiff": True}])
def test_every_pixel_type_is_one_imagej_stack(dtype: type, options: dict) -> None:
    if np.dtype(dtype).kind == "f":
        volume = RNG.random((3, 150, 130)).astype(dtype)
    else:
        volume = RNG.integers(0, np.iinfo(dtype).max, (3, 150, 130), dtype=dtype, endpoint=True)
    data = written(volume, Volume(3, 150, 130, np.dtype(dtype)), **options)
    back = read_volume(data)
    assert back.dtype == dtype and back.shape == (3, 150, 130)
    assert np.array_equal(back, volume)  # 32-bit ids beyond 2**24 too: tifffile reads uint32
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.is_bigtiff == bool(options.get("bigtiff"))
        assert tif.pages[0].is_tiled == ("tile" in options)


def test_rgb_and_one_page_volumes() -> None:
    rgb = RNG.integers(0, 255, (2, 40, 50, 3), dtype=np.uint8)
    back = read_volume(volume_bytes(list(rgb), rgb=True))
    assert back.shape == (2, 40, 50, 3) and np.array_equal(back, rgb)
    one = RNG.integers(0, 255, (40, 50), dtype=np.uint8)
    assert np.array_equal(read_volume(volume_bytes([one])), one)  # one page: (H, W)


def test_several_classes_are_one_series_without_imagej_metadata() -> None:
    probs = RNG.random((2, 70, 90, 3)).astype(np.float32)
    data = written(probs, Volume(2, 70, 90, np.dtype(np.float32), samples=3), tile=64)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert not tif.is_imagej and len(tif.series) == 1
    assert np.array_equal(tifffile.imread(io.BytesIO(data)), probs)


def test_labels_are_16_bit_while_every_page_fits() -> None:
    small = [np.arange(20, dtype=np.uint32).reshape(4, 5) * k for k in (1, 3000)]
    assert small[1].max() == 57000
    back = read_volume(labels_bytes(small))
    assert back.dtype == np.uint16 and np.array_equal(back, np.stack(small))
    large = [small[0], small[0] + 70_000]
    back = read_volume(labels_bytes(large))
    assert back.dtype == np.uint32 and np.array_equal(back, np.stack(large))
    assert labels_dtype(65535) == np.uint16 and labels_dtype(65536) == np.uint32


def test_types_imagej_cannot_open_are_refused() -> None:
    with pytest.raises(ValueError, match="not written"):
        Volume(1, 4, 4, np.dtype(np.int64))
    with pytest.raises(ValueError, match="RGB"):
        Volume(1, 4, 4, np.dtype(np.uint16), samples=3, rgb=True)
