"""Where a tiled image's outputs go, tile by tile (MONAI's "merger"): each tile's (K, S, S)
probabilities and (S, S) mask come back in any order, and a sink keeps the part the tile owns
(`TilePlan.write_window`: each output pixel from exactly one tile, nothing blended).

- `MemorySink`: the whole (H, W) mask, and the (K, H, W) probabilities when asked for: an
  answer made in memory (a request; a job's page computed whole).
- `SumSink`: adds the probabilities into an array given to it (test-time augmentation sums
  its views into one float64 array, each through a turned view of it).
- `BandSink`: a page streamed to a writer (`imaging.tiff_writer.SectionWriter`) band by band,
  a band (a row of tiles) as soon as it and every band above it are complete: memory stays
  flat in the page's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from unet_service.core.tiling import Stitcher, Tile, TilePlan
from unet_service.imaging.encode import mask_pixels
from unet_service.imaging.tiff_writer import SectionWriter


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8: 0/1 for one class, class index for several
    probabilities: np.ndarray | None  # (K, H, W) float32, when asked for


@dataclass(frozen=True)
class PageResult:
    """What a page streamed to a writer returns: its rows are in the writer's queue."""

    page: int
    height: int
    width: int
    tiles: int


class Sink(Protocol):
    def aggregate(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        """Keep the part of one tile's (K, S, S) probabilities and (S, S) mask it owns."""

    def finish(self) -> object:
        """The result, once every tile is in (raises if one is missing)."""


class MemorySink:
    def __init__(self, plan: TilePlan, out_channels: int, probabilities: bool) -> None:
        self._mask = Stitcher(plan, 1, np.uint8)
        self._probs = Stitcher(plan, out_channels, np.float32) if probabilities else None

    def aggregate(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        self._mask.aggregate(mask[None], tile)
        if self._probs is not None:
            self._probs.aggregate(probabilities, tile)

    def finish(self) -> Segmentation:
        probabilities = self._probs.finalize() if self._probs is not None else None
        return Segmentation(self._mask.finalize()[0], probabilities)


class SumSink:
    def __init__(self, plan: TilePlan, into: np.ndarray) -> None:
        self._sum = Stitcher(plan, into.shape[0], add_into=into)

    def aggregate(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        self._sum.aggregate(probabilities, tile)

    def finish(self) -> None:
        self._sum.finalize()  # raises if a tile is missing


class BandSink:
    """Page `page` of a streamed result: `output` "mask" (as every mask file stores it,
    `mask_pixels`) or "probabilities" (float32, one sample per class), written to `writer`,
    whose pages before this one must be complete."""

    def __init__(
        self, plan: TilePlan, page: int, writer: SectionWriter, output: str, classes: int
    ) -> None:
        if output not in ("mask", "probabilities"):
            raise ValueError(f"only a mask or probabilities are streamed, not {output!r}")
        if writer.rows_written != page * plan.height:
            raise ValueError(f"the writer expects page {writer.rows_written / plan.height:g}")
        self.plan, self.page, self.output = plan, page, output
        self._writer = writer
        self._classes = classes
        self._cols = len(plan.cols)
        self._rows = plan.rows
        self._bands: dict[int, np.ndarray] = {}  # band index -> (rows, W[, K]) being stitched
        self._band_done = [0] * len(self._rows)  # tiles stitched per band
        self._next_band = 0  # first band not yet written
        self.max_rows_held = 0  # most output rows being stitched at once (tests)

    def before_read(self) -> None:
        """Called before a tile is read: waits while the writer is far behind (in the
        inference thread, so the disk slows inference down, never an event loop)."""
        self._writer.wait_for_room()

    def aggregate(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        band = tile.index // self._cols
        rows, cols = self.plan.write_window(tile)
        buffer = self._bands.get(band)
        if buffer is None:
            buffer = self._bands[band] = self._new_band(rows.stop)
            held = sum(len(b) for b in self._bands.values())
            self.max_rows_held = max(self.max_rows_held, held)
        dst = buffer[:, tile.col : tile.col + cols.stop]
        if self.output == "mask":
            dst[...] = mask_pixels(mask[rows, cols], self._classes)
        else:
            dst[...] = probabilities[:, rows, cols].transpose(1, 2, 0)
        self._band_done[band] += 1
        while self._next_band < len(self._rows) and self._band_done[self._next_band] == self._cols:
            self._writer.write_rows(self._bands.pop(self._next_band))
            self._next_band += 1

    def finish(self) -> PageResult:
        if self._next_band < len(self._rows):
            raise RuntimeError(f"band {self._next_band} of page {self.page} was never stitched")
        return PageResult(self.page, self.plan.height, self.plan.width, len(self.plan))

    def _new_band(self, rows: int) -> np.ndarray:
        width = self.plan.width
        if self.output == "mask":
            return np.zeros((rows, width), np.uint8)
        return np.zeros((rows, width, self._classes), np.float32)
