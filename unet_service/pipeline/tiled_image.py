"""One image through overlap-tile inference, the same way for every image: a page of a source
(`imaging.sources`), planned once, its tiles cut lazily from the source's windows, their
outputs kept by a sink (`pipeline.sinks`). What differs between a request and a job is only
the source (in memory, or a file read by window) and the sink (in memory, or streamed to a
file).

This is the per-image half of the recipe (plan -> cut -> ... -> stitch); the other half,
normalise -> forward -> threshold, is `core.runner.BatchRunner`, which computes tiles of any
number of images in one batch. The queue holds many and interleaves their tiles. A queue
entry is one `TiledImage`, or a `TileGroup` of several handed out one after another as one
entry: a stack's pages (`TiledStack`), or test-time augmentation's 8 views of an image
(`AveragedViews`: each view a `TiledImage` over a turned view of the source, summing into a
turned view of one float64 array, so no inverse transform is ever copied; float32 values sum
exactly in float64, so the average does not depend on the order in which batches return).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unet_service.core.tiling import Tile, TileCounts, TilePlan
from unet_service.imaging.decode import match_channels
from unet_service.imaging.sources import Source
from unet_service.pipeline.sinks import Segmentation, Sink


class TiledImage(TileCounts):
    """Page `page` of `source`, tiled by `plan`, its outputs to `sink`. Tiles are handed out
    by `take` in plan order (row after row) and may come back through `add` in any order.
    `statistics`: what gives the page's statistics its model's normalisation needs (see
    `pipeline.recipe.Recipe.measure`), or None. `tiles`: only these of the plan's tiles (a
    block of the page, `pipeline.blocks`)."""

    def __init__(
        self,
        source: Source,
        page: int,
        plan: TilePlan,
        sink: Sink,
        in_channels: int,
        statistics: Callable[[], Any] | None = None,
        tiles: Sequence[Tile] | None = None,
    ) -> None:
        if (plan.height, plan.width) != (source.height, source.width):
            raise ValueError(f"the plan {plan.height}x{plan.width} does not match the source")
        if not 0 <= page < source.pages:
            raise ValueError(f"page {page} of {source.pages}")
        self.source, self.page, self.plan, self.sink = source, page, plan, sink
        self._in_channels = in_channels
        self._statistics = statistics
        self._before_read = getattr(sink, "before_read", None)
        self.total = len(plan) if tiles is None else len(tiles)
        self.taken = 0  # tiles handed out
        self.done = 0  # tiles stitched
        self._tiles = iter(plan if tiles is None else tiles)

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    def take(self) -> Tile:
        tile = next(self._tiles)
        self.taken += 1
        return tile

    def tile_input(self, tile: Tile) -> np.ndarray:
        """The tile's (C, S, S) input in the source's dtype (not normalised): the plan's
        mirror indices applied to the smallest window of the source they touch, so it equals
        `TilePlan.extract` on the whole image."""
        if self._before_read is not None:
            self._before_read()
        ys, xs = self.plan.input_indices(tile)
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        window = match_channels(self.source.read(self.page, y0, y1, x0, x1), self._in_channels)
        # np.take along each axis: a fifth of the time of fancy indexing for a grey tile.
        rows = np.take(window, ys - y0, axis=0)
        return np.ascontiguousarray(np.take(rows, xs - x0, axis=1).transpose(2, 0, 1))

    def statistics(self, tile: Tile) -> Any:
        """The page's statistics for the model's normalisation (None when it needs none),
        computed at the first call."""
        return None if self._statistics is None else self._statistics()

    def add(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        """Stitch one tile's (K, S, S) probabilities and (S, S) mask."""
        self.sink.aggregate(tile, probabilities, mask)
        self.done += 1

    def result(self) -> Any:
        if not self.complete:
            raise RuntimeError(f"{self.outstanding} of {self.total} tiles were never stitched")
        return self.sink.finish()


Entry = TiledImage  # or any TileGroup: what the queue and the runner take tiles from


class TileGroup(TileCounts):
    """Several parts (images of one tile size) as one entry of the tile queue: the batcher's
    round-robin counts the group as one line, and a failure, a deadline or a cancellation
    reaches every part at once. Tiles are handed out part by part, so parts finish in
    order."""

    def __init__(self, parts: Sequence[TiledImage | TileGroup]) -> None:
        if not parts:
            raise ValueError("a group needs at least one part")
        if len({part.tile_size for part in parts}) != 1:
            raise ValueError("the parts of a group must share one tile size")
        self.parts = list(parts)
        self.total = sum(part.total for part in parts)
        self.taken = 0
        self.done = 0
        self._part = 0  # the part whose tiles are handed out next

    @property
    def tile_size(self) -> int:
        return self.parts[0].tile_size

    def take(self) -> tuple[int, Any]:
        while self.parts[self._part].pending == 0:
            self._part += 1
        ref = self.parts[self._part].take()
        self.taken += 1
        return self._part, ref

    def tile_input(self, ref: tuple[int, Any]) -> np.ndarray:
        part, tile = ref
        return self.parts[part].tile_input(tile)

    def statistics(self, ref: tuple[int, Any]) -> Any:
        part, tile = ref
        return self.parts[part].statistics(tile)

    def add(self, ref: tuple[int, Any], probabilities: np.ndarray, mask: np.ndarray) -> None:
        part, tile = ref
        self.parts[part].add(tile, probabilities, mask)
        self.done += 1

    def result(self) -> Any:
        return [part.result() for part in self.parts]


class TiledStack(TileGroup):
    """A stack's pages (of one size, hence one tile size) as one entry: a 30-page stack
    takes no more turns than a single image beside it, while alone it fills every batch.
    Its result is the list of its pages' results."""

    @property
    def pages(self) -> list[TiledImage | TileGroup]:
        return self.parts


class AveragedViews(TileGroup):
    """Test-time augmentation of one image: its views' tiles summed into `total` (K, H, W)
    float64, then averaged and thresholded by `to_mask`."""

    def __init__(
        self,
        views: Sequence[TiledImage],
        total: np.ndarray,
        to_mask: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        super().__init__(views)
        self._total = total
        self._to_mask = to_mask

    def result(self) -> Segmentation:
        super().result()  # each view's sink raises if a tile is missing
        average = (self._total / len(self.parts)).astype(np.float32)
        return Segmentation(self._to_mask(average), average)
