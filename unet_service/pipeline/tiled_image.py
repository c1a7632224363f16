"""One image through overlap-tile inference: its plan, its tiles cut lazily from the image,
the stitchers that collect their outputs, and the result.

This is the per-image half of the recipe (plan -> cut -> ... -> stitch); the other half,
normalise -> forward -> threshold, is `core.runner.BatchRunner`, which computes tiles of
any number of TiledImages in one batch. `Segmenter.segment` loops over one TiledImage; the
service's queue holds many and interleaves their tiles.

Test-time augmentation (`variants=8`): the image is also seen rotated by 90, 180 and 270
degrees and mirrored (8 views, the dihedral group), each view tiled exactly like the image
itself, and the views' probabilities are averaged back in the image's frame. Each view's
tiles are written into a rotated/mirrored *view* of one float64 sum, so no inverse transform
is ever copied; float32 values sum exactly in float64, so the average does not depend on the
order in which batches return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from unet_service.core.tiling import Stitcher, Tile, TileCounts, TilePlan

VARIANTS = (1, 8)
# View k: rotated k % 4 times by 90 degrees, then mirrored left-right when k >= 4.
TileRef = tuple[int, Tile]  # (view, tile): what `take` hands out


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8: 0/1 for one class, class index for several
    probabilities: np.ndarray | None  # (K, H, W) float32, when asked for


def mask_pixels(mask: np.ndarray, out_channels: int) -> np.ndarray:
    """A mask as every output file stores it: one class 0/255, so the file is viewable;
    several, the class index."""
    return mask * np.uint8(255) if out_channels == 1 else mask


def view(array: np.ndarray, k: int, axes: tuple[int, int]) -> np.ndarray:
    """The k-th dihedral view of `array` over two axes, as a numpy view (no copy)."""
    rotated = np.rot90(array, k % 4, axes=axes)
    if k < 4:
        return rotated
    index = [slice(None)] * array.ndim
    index[axes[1]] = slice(None, None, -1)
    return rotated[tuple(index)]


class TiledImage(TileCounts):
    """A prepared (H, W, C) image, its tile plan and its stitched outputs. Tiles are handed
    out by `take` in plan order and may come back through `add` in any order."""

    def __init__(
        self,
        image: np.ndarray,
        plan: TilePlan,
        out_channels: int,
        probabilities: bool,
        variants: int = 1,
        to_mask: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if image.shape[:2] != (plan.height, plan.width):
            raise ValueError(f"image {image.shape[:2]} does not match its plan")
        if variants not in VARIANTS:
            raise ValueError(
                f"test-time augmentation takes {' or '.join(map(str, VARIANTS))} views"
            )
        if variants > 1 and to_mask is None:
            raise ValueError("averaged views need to_mask to make their mask")
        self.image = image
        self.plan = plan
        self.variants = variants
        self._to_mask = to_mask
        self._stitchers: list[Stitcher] = []  # one per averaged view
        if variants == 1:
            self._views = [(image, plan)]
            self._mask: Stitcher | None = Stitcher(plan, 1, np.uint8)
            self._probs = Stitcher(plan, out_channels, np.float32) if probabilities else None
        else:
            self._sum = np.zeros((out_channels, plan.height, plan.width), np.float64)
            self._views = []
            for k in range(variants):
                pixels = view(image, k, (0, 1))
                height, width = pixels.shape[:2]
                view_plan = TilePlan(height, width, plan.geometry, plan.tile_size)
                self._views.append((pixels, view_plan))
                into = view(self._sum, k, (1, 2))
                self._stitchers.append(Stitcher(view_plan, out_channels, add_into=into))
            self._mask = None
            self._probs = None
        self.total = sum(len(p) for _, p in self._views)
        self.taken = 0  # tiles handed out
        self.done = 0  # tiles stitched
        self._tiles: Iterator[TileRef] = (
            (k, tile) for k, (_, view_plan) in enumerate(self._views) for tile in view_plan
        )

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    def take(self) -> TileRef:
        ref = next(self._tiles)
        self.taken += 1
        return ref

    def tile_input(self, ref: TileRef) -> np.ndarray:
        """The tile's (C, S, S) input window in the image's own dtype (not normalised)."""
        k, tile = ref
        pixels, view_plan = self._views[k]
        return view_plan.extract(pixels, tile)

    def add(self, ref: TileRef, probabilities: np.ndarray, mask: np.ndarray) -> None:
        """Stitch one tile's (K, S, S) probabilities and (S, S) mask."""
        k, tile = ref
        if self._mask is not None:
            self._mask.aggregate(mask[None], tile)
            if self._probs is not None:
                self._probs.aggregate(probabilities, tile)
        else:
            self._stitchers[k].aggregate(probabilities, tile)
        self.done += 1

    def result(self) -> Segmentation:
        if self._mask is not None:
            probabilities = self._probs.finalize() if self._probs is not None else None
            return Segmentation(self._mask.finalize()[0], probabilities)
        for stitcher in self._stitchers:
            stitcher.finalize()  # raises if a view is incomplete
        assert self._to_mask is not None
        average = (self._sum / self.variants).astype(np.float32)
        return Segmentation(self._to_mask(average), average)


StackRef = tuple[int, TileRef]  # (page, tile of that page)


class TiledStack(TileCounts):
    """The pages of a stack (TiledImages of one size, hence one tile size) as one entry of
    the tile queue: the batcher's round-robin then counts the whole stack as one line, so
    a 30-page stack takes no more turns than a single image beside it, while alone it fills
    every batch. A failure, a deadline or a cancellation reaches all its pages at once.
    Tiles are handed out page by page, so pages finish in order."""

    def __init__(self, pages: list[TiledImage]) -> None:
        if not pages:
            raise ValueError("a stack needs at least one page")
        if len({page.tile_size for page in pages}) != 1:
            raise ValueError("the pages of a stack must share one tile size")
        self.pages = pages
        self.total = sum(page.total for page in pages)
        self.taken = 0
        self.done = 0
        self._page = 0  # the page whose tiles are handed out next

    @property
    def tile_size(self) -> int:
        return self.pages[0].tile_size

    def take(self) -> StackRef:
        while self.pages[self._page].pending == 0:
            self._page += 1
        ref = self.pages[self._page].take()
        self.taken += 1
        return self._page, ref

    def tile_input(self, ref: StackRef) -> np.ndarray:
        page, tile = ref
        return self.pages[page].tile_input(tile)

    def add(self, ref: StackRef, probabilities: np.ndarray, mask: np.ndarray) -> None:
        page, tile = ref
        self.pages[page].add(tile, probabilities, mask)
        self.done += 1

    def result(self) -> list[Segmentation]:
        return [page.result() for page in self.pages]
