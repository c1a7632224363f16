"""Shared by the section tests: real EM mosaics of any size, TIFFs of them, tiny real models,
and the comparison of a streamed result with the in-memory one."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import TILE, save_tiny

from conftest import isbi_slice
from unet_service.core.engine import Segmenter
from unet_service.pipeline.sinks import Segmentation

__all__ = ["TILE"]

LIMITS = {"max_pixels": 10**8, "max_pages": 16}
TOLERANCE = 1e-5  # docs/inference.md, Precision: tiled vs whole, fp32


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


# Pixel type, layout and compression: the image (from the mosaic) and tifffile's options. The
# whole mosaic once; crops of it elsewhere, a few chunks each way, to keep the suite quick.
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], dict]] = {
    "tiled-deflate-8bit": (lambda a: a, {"tile": (128, 96), "compression": "zlib"}),
    "strips-lzw-16bit": (
        lambda a: a[:200, :300].astype(np.uint16) * 257 + np.uint16(77),
        {"rowsperstrip": 9, "compression": "lzw"},
    ),
    "one-raw-strip-8bit": (lambda a: a[:200, :300], {"rowsperstrip": 200}),
    "tiled-raw-16bit": (lambda a: a[:200, :300].astype(np.uint16) * 250, {"tile": (64, 64)}),
    "strips-zstd-float": (
        lambda a: a[:200, :300].astype(np.float32) / 255,
        {"rowsperstrip": 16, "compression": "zstd"},
    ),
    "tiny-image": (lambda a: a[:37, :23], {}),
}
