"""Computing a batch of tiles of any images: cut, normalise, forward, threshold, with the
device's memory in mind.

`BatchRunner` is the one callable the service's batcher is given (and `Segmenter.segment`
uses too): it owns the batch limit, which an out-of-memory error halves (the batch then runs
in pieces) and which is raised again after OOM_PROBE_PASSES good passes, so a transient
memory spike does not cost throughput forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger("unet_service.core.runner")

OOM_PROBE_PASSES = 200


class Model(Protocol):
    """What a batch needs of the model (`core.engine.Segmenter`,
    `zoo.segmenter.PackageSegmenter`)."""

    def normalize(self, raw: np.ndarray, statistics: Any = None) -> np.ndarray: ...

    def forward(self, batch: np.ndarray) -> np.ndarray: ...

    def to_mask(self, probabilities: np.ndarray) -> np.ndarray: ...


class TileImage(Protocol):
    """What a batch's tiles come from: a `pipeline.tiled_image.TiledImage` (a page of a
    source) or a group of them (a stack, test-time augmentation's views). Tile references
    are opaque: whatever `take` hands out goes back to `tile_input` and `add`."""

    @property
    def pending(self) -> int: ...

    def take(self) -> Any: ...

    def tile_input(self, ref: Any) -> np.ndarray: ...

    def statistics(self, ref: Any) -> Any: ...

    def add(self, ref: Any, probabilities: np.ndarray, mask: np.ndarray) -> None: ...


# What a batch is made of, and what each of its tiles gives back: (probabilities, mask).
BatchItem = tuple[TileImage, Any]
TileOutput = tuple[np.ndarray, np.ndarray]


def run_tiles(
    image: TileImage, run: BatchRunner, on_batch: Callable[[int], None] | None = None
) -> None:
    """Every tile of one image through `run`, `run.limit` tiles per pass, in this thread:
    the loop of `Segmenter.segment` and of each page of a section. Tiles are taken, cut and
    stitched a batch at a time, so only one batch of inputs is ever in memory."""
    while image.pending:
        items = [(image, image.take()) for _ in range(min(run.limit, image.pending))]
        for (_, ref), (probs, mask) in zip(items, run(items), strict=True):
            image.add(ref, probs, mask)
        if on_batch is not None:
            on_batch(len(items))


class BatchRunner:
    """Runs batches of (image, tile) on a Segmenter. Thread-compatible: one owner (the
    service's inference thread, or a CLI loop) calls it; others may read `limit`."""

    def __init__(
        self,
        segmenter: Model,
        max_batch: int,
        on_oom_split: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("the batch limit must be >= 1")
        self.segmenter = segmenter
        self.max_batch = max_batch
        self.limit = max_batch  # lowered after out-of-memory errors
        self._passes_since_oom = 0
        self._on_oom_split = on_oom_split

    def __call__(self, items: Sequence[BatchItem]) -> list[TileOutput]:
        seg = self.segmenter
        batch = np.stack(
            [seg.normalize(image.tile_input(tile), image.statistics(tile)) for image, tile in items]
        )
        probs = self._forward_splitting(batch)
        return [(p, seg.to_mask(p)) for p in probs]

    def _forward_splitting(self, batch: np.ndarray) -> np.ndarray:
        """Forward; on an out-of-memory error halve the limit (down to one tile) and run the
        batch in pieces of that size."""
        try:
            out = self.segmenter.forward(batch)
        except torch.OutOfMemoryError:
            n = len(batch)
            if n == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # A plain int store; the batcher on the event loop only reads it.
            self.limit = max(1, min(self.limit, n // 2))
            self._passes_since_oom = 0
            if self._on_oom_split is not None:
                self._on_oom_split()
            log.warning(
                "out of memory on a batch of %d tiles; retrying %d at a time", n, self.limit
            )
            # Read the limit on every step: an inner retry may have lowered it again.
            parts, start = [], 0
            while start < n:
                stop = start + self.limit
                parts.append(self._forward_splitting(batch[start:stop]))
                start = stop
            return np.concatenate(parts)
        if self.limit < self.max_batch:
            self._passes_since_oom += 1
            if self._passes_since_oom >= OOM_PROBE_PASSES:
                self.limit = min(self.max_batch, self.limit * 2)
                self._passes_since_oom = 0
        return out
