"""How one model segments images: the tile plan of an image (made here, and only here), the
queue entry of an image or stack answered in memory, and a page of a source with a sink of
the caller's. A `Recipe` knows the model's shape and threshold, not the model: it is
torch-free, and the same for a request, a job and the command line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_service.core.geometry import TileGeometry
from unet_service.core.tiling import TilePlan, plan_image
from unet_service.imaging.decode import match_channels
from unet_service.imaging.sources import ArraySource, Source, check_values
from unet_service.pipeline.outputs import TTA_VIEWS
from unet_service.pipeline.sinks import MemorySink, Sink, SumSink
from unet_service.pipeline.tiled_image import AveragedViews, TiledImage, TiledStack
from unet_service.pipeline.views import VIEWS, DihedralView, view


@dataclass(frozen=True)
class Recipe:
    """`tile_sizes`: one legal output tile size, or several to choose from per image (the
    one that computes it with the least work). `to_mask`: (K, ...) probabilities -> (...)
    uint8 mask. `measure`: for a model whose normalisation needs statistics of the whole
    image (a bioimage.io package's sample-wise preprocessing), what computes them from a page
    of a source; they are computed once per page, when its first tile is cut (in the
    inference thread), and shared by its views."""

    geometry: TileGeometry
    tile_sizes: tuple[int, ...]
    in_channels: int
    out_channels: int
    to_mask: Callable[[np.ndarray], np.ndarray]
    measure: Callable[[Source, int], Any] | None = None

    def plan(self, height: int, width: int) -> TilePlan:
        if len(self.tile_sizes) == 1:
            return TilePlan(height, width, self.geometry, self.tile_sizes[0])
        return plan_image(height, width, self.geometry, self.tile_sizes)

    def tiles(self, height: int, width: int, pages: int = 1, tta: int = 1) -> int:
        """Tiles of a stack: every page's, of every view (a turned view has as many)."""
        return pages * tta * len(self.plan(height, width))

    def page(self, source: Source, page: int, sink: Callable[[TilePlan], Sink]) -> TiledImage:
        """Page `page` of `source`, its outputs to the sink `sink(plan)` makes."""
        plan = self.plan(source.height, source.width)
        statistics = self.statistics(source, page)
        return TiledImage(source, page, plan, sink(plan), self.in_channels, statistics)

    def statistics(self, source: Source, page: int) -> Callable[[], Any] | None:
        """What gives page `page`'s statistics (measured once, when first asked), or None
        for a model that needs none."""
        if self.measure is None:
            return None
        return functools.cache(functools.partial(self.measure, source, page))

    def for_images(
        self, images: list[np.ndarray], *, probabilities: bool, tta: int = 1
    ) -> TiledImage | AveragedViews | TiledStack:
        """Decoded pages (each (H, W, C), one size) answered in memory, as one queue entry:
        their values checked as a job's file's are (`imaging.sources.check_values`), their
        channels matched to the model's, then `in_memory`."""
        check_values(ArraySource(images))
        source = ArraySource([match_channels(image, self.in_channels) for image in images])
        return self.in_memory(source, probabilities=probabilities, tta=tta)

    def in_memory(
        self, source: Source, *, probabilities: bool, tta: int = 1
    ) -> TiledImage | AveragedViews | TiledStack:
        """Every page of `source` answered in memory, as one queue entry: each page's
        `Segmentation` (its mask, and its probabilities when asked for or averaged), a list
        of them for a stack. `tta=8` averages the 8 views of each page."""
        if tta not in TTA_VIEWS:
            raise ValueError(f"test-time augmentation takes 1 or {VIEWS} views, not {tta}")
        pages = [self._page_in_memory(source, p, probabilities, tta) for p in range(source.pages)]
        return pages[0] if len(pages) == 1 else TiledStack(pages)

    def _page_in_memory(
        self, source: Source, page: int, probabilities: bool, tta: int
    ) -> TiledImage | AveragedViews:
        if tta == 1:
            return self.page(
                source, page, lambda plan: MemorySink(plan, self.out_channels, probabilities)
            )
        size = self.plan(source.height, source.width).tile_size
        total = np.zeros((self.out_channels, source.height, source.width), np.float64)
        # A turned view's statistics are the image's (its pixels, and its padded border).
        statistics = self.statistics(source, page)
        views = []
        for k in range(VIEWS):
            turned = DihedralView(source, k)
            plan = TilePlan(turned.height, turned.width, self.geometry, size)
            sink = SumSink(plan, view(total, k, (1, 2)))
            views.append(TiledImage(turned, page, plan, sink, self.in_channels, statistics))
        return AveragedViews(views, total, self.to_mask)
