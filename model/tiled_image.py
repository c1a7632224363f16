"""One image through overlap-tile inference: its plan, its tiles cut lazily from the image,
the stitchers that collect their outputs, and the result.

This is the per-image half of the recipe (plan -> cut -> ... -> stitch); the other half,
normalise -> forward -> threshold, is `model.runner.BatchRunner`, which computes tiles of
any number of TiledImages in one batch. `Segmenter.segment` loops over one TiledImage; the
service's queue holds many and interleaves their tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from model.tiling import Stitcher, Tile, TilePlan


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8: 0/1 for one class, class index for several
    probabilities: np.ndarray | None  # (K, H, W) float32, when asked for


class TiledImage:
    """A prepared (H, W, C) image, its tile plan and its stitched outputs. Tiles are handed
    out by `take` in plan order and may come back through `add` in any order."""

    def __init__(
        self, image: np.ndarray, plan: TilePlan, out_channels: int, probabilities: bool
    ) -> None:
        if image.shape[:2] != (plan.height, plan.width):
            raise ValueError(f"image {image.shape[:2]} does not match its plan")
        self.image = image
        self.plan = plan
        self.total = len(plan)
        self.taken = 0  # tiles handed out
        self.done = 0  # tiles stitched
        self._tiles: Iterator[Tile] = iter(plan)
        self._mask = Stitcher(plan, 1, np.uint8)
        self._probs = Stitcher(plan, out_channels, np.float32) if probabilities else None

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    @property
    def pending(self) -> int:
        """Tiles not handed out yet."""
        return self.total - self.taken

    @property
    def outstanding(self) -> int:
        """Tiles not stitched yet."""
        return self.total - self.done

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def take(self) -> Tile:
        tile = next(self._tiles)
        self.taken += 1
        return tile

    def tile_input(self, tile: Tile) -> np.ndarray:
        """The tile's (C, S, S) input window in the image's own dtype (not normalised)."""
        return self.plan.extract(self.image, tile)

    def add(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        """Stitch one tile's (K, S, S) probabilities and (S, S) mask."""
        self._mask.aggregate(mask[None], tile)
        if self._probs is not None:
            self._probs.aggregate(probabilities, tile)
        self.done += 1

    def result(self) -> Segmentation:
        probabilities = self._probs.finalize() if self._probs is not None else None
        return Segmentation(self._mask.finalize()[0], probabilities)
