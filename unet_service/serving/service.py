"""The service behind every transport: the loaded model and what may be shown of it, its
lifecycle (starting -> ready -> draining -> stopped) and its tile batcher. What it is asked
is `serving.segment` (a request) and `jobs` (a job); it raises `unet_service.errors` and
`imaging.errors`, never an HTTP answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner
from unet_service.core.tiling import tile_sizes
from unet_service.errors import UnavailableError
from unet_service.imaging.pages import decode_pages
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.serving.batcher import TileBatcher
from unet_service.serving.limits import check_instances
from unet_service.serving.metrics import Metrics
from unet_service.serving.queued import QueuedImage, ShuttingDownError
from unet_service.settings import Settings

log = logging.getLogger("unet_service.serving.service")


class State(StrEnum):
    """The service's one lifecycle state: starting -> ready -> draining -> stopped."""

    starting = "starting"
    ready = "ready"
    draining = "draining"
    stopped = "stopped"


@dataclass(frozen=True)
class ModelInfo:
    """What the routes show of the model (from its card) and of how it is served."""

    name: str
    description: str
    class_names: list[str]
    threshold: float
    depth: int
    in_channels: int
    out_channels: int
    tile_sizes: tuple[int, ...]
    # The card's headline validation figures, each defined (core.card_metrics); {} if none.
    metrics: dict[str, dict[str, Any]]


def load_segmenter(settings: Settings) -> Segmenter:
    """The one way the service loads its model (at start-up, in production and in tests).
    Raises WeightsError or ValueError with a one-line reason."""
    segmenter = Segmenter.from_weights(
        settings.weights, settings.device, settings.precision, settings.backend, settings.compile
    )
    settings.check_tile_size(segmenter.geometry)
    return segmenter


class InferenceService:
    def __init__(self, settings: Settings, segmenter: Segmenter, metrics: Metrics) -> None:
        settings.check_tile_size(segmenter.geometry)
        self.settings = settings
        self.segmenter = segmenter
        self.metrics = metrics
        card = segmenter.card
        self.info = ModelInfo(
            name=card.name,
            description=card.description,
            class_names=list(card.class_names),
            threshold=card.threshold,
            depth=card.depth,
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            tile_sizes=tile_sizes(segmenter.geometry, settings.tile_size),
            metrics=card.metrics_summary(),
        )
        self.runner = BatchRunner(
            segmenter,
            settings.batch_tiles_for(segmenter.device.type),
            on_oom_split=metrics.oom_splits.inc,
        )
        self.batcher = TileBatcher(
            self.runner,
            lambda: self.runner.limit,
            background_batch_limit=lambda: min(
                self.runner.limit, settings.job_batch_tiles_for(segmenter.device.type)
            ),
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_tiles=settings.max_queue_tiles,
            metrics=metrics,
        )
        self.state = State.starting
        metrics.add_device_memory(segmenter.memory_stats)

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def ready(self) -> bool:
        return self.state is State.ready

    async def start(self) -> None:
        """Warm up every tile size (and, for compiled graphs, every batch shape), then start
        the worker and report ready."""
        started = time.monotonic()
        seg = self.segmenter
        await asyncio.to_thread(seg.warm_up, self.info.tile_sizes, self.runner.max_batch)
        self.batcher.start()
        self._set_state(State.ready)
        log.info(
            "model %r ready on %s (%s, %s) in %.1f s: depth %d, tile sizes %s, batch <= %d tiles",
            self.model_name,
            seg.device,
            seg.backend.name,
            seg.precision,
            time.monotonic() - started,
            seg.geometry.depth,
            "/".join(map(str, self.info.tile_sizes)),
            self.runner.max_batch,
        )

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.ready.set(1 if state is State.ready else 0)

    def begin_drain(self) -> None:
        """Called on SIGTERM: refuse new work at once, keep serving what was accepted."""
        if self.state in (State.starting, State.ready):
            self._set_state(State.draining)

    async def shutdown(self, timeout: float) -> None:
        self.begin_drain()
        await self.batcher.drain(timeout)
        self._set_state(State.stopped)

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Hold while a request is received, decoded and submitted (once per request)."""
        return self.batcher.arriving()

    def check_available(self) -> None:
        if self.state is State.starting:
            raise UnavailableError("the model is still loading", retry_after=5)
        if self.state is not State.ready:
            raise ShuttingDownError()

    async def decode(self, data: bytes) -> list[np.ndarray]:
        """Upload bytes -> its pages, each (H, W, C) (one for anything but a multi-page
        TIFF), off the event loop. UNET_MAX_PIXELS bounds all pages together,
        UNET_MAX_PAGES their count: both are checked from the headers."""
        settings = self.settings
        return await asyncio.to_thread(decode_pages, data, settings.max_pixels, settings.max_pages)

    def submit(self, entry: TiledImage | TileGroup) -> QueuedImage:
        """Queue a request's planned image or stack, or refuse at once (QueueFullError,
        TooManyTilesError, ShuttingDownError)."""
        self.check_available()  # the state may have changed while the image was planned
        return self.batcher.submit(entry)

    def submit_background(self, image: TiledImage | TileGroup) -> QueuedImage:
        """Queue a section job's page (prepared and planned by the job): computed when no
        request's tiles wait (see serving.batcher)."""
        return self.batcher.submit(image, background=True)

    def label(self, pages: list[Segmentation]) -> list[np.ndarray]:
        """(H, W) uint32 cell labels of each page (its probabilities kept); each page is
        labelled on its own (ids start at 1 on every page). Blocking."""
        check_instances(self.settings, self.info.out_channels)
        return [self.segmenter.instances(page.probabilities) for page in pages]
