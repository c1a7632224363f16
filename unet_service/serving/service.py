"""The service behind every transport: the loaded model and what may be shown of it, its
lifecycle (starting -> ready -> draining -> stopped) and its tile batcher. What it is asked
is `serving.segment` (a request) and `jobs` (a job); it raises `unet_service.errors` and
`imaging.errors`, never an HTTP answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import StrEnum
from pathlib import Path

import numpy as np

from unet_service.core.engine import TiledModel
from unet_service.core.runner import BatchRunner
from unet_service.errors import UnavailableError
from unet_service.imaging.pages import decode_pages
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.serving.batcher import TileBatcher
from unet_service.serving.catalog import ModelInfo, discover, open_model
from unet_service.serving.limits import check_instances
from unet_service.serving.metrics import Metrics
from unet_service.serving.models import LoadedModel, ModelRepository
from unet_service.serving.queued import QueuedImage, ShuttingDownError
from unet_service.settings import Settings

log = logging.getLogger("unet_service.serving.service")


class State(StrEnum):
    """The service's one lifecycle state: starting -> ready -> draining -> stopped."""

    starting = "starting"
    ready = "ready"
    draining = "draining"
    stopped = "stopped"


def load_segmenter(settings: Settings, weights: Path | None = None) -> TiledModel:
    """The one way the service loads a model (at start-up and on demand, in production and
    in tests): our weights, or a bioimage.io package (`zoo`, run in float32 by its own
    weights; UNET_PRECISION and UNET_COMPILE are ours). Raises WeightsError or ValueError
    (PackageError) with a one-line reason."""
    segmenter = open_model(
        weights or settings.weights,
        settings.device,
        settings.precision,
        settings.backend,
        settings.compile,
        settings.max_pixels,
    )
    settings.check_tile_size(segmenter.geometry)
    return segmenter


class InferenceService:
    """The models (`serving.models`), the one tile batcher that owns the device (a lane per
    model), and the lifecycle. `preloaded`: the default model's engine, already loaded."""

    def __init__(
        self, settings: Settings, metrics: Metrics, preloaded: TiledModel | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics

        def load(name: str, weights: Path) -> LoadedModel:
            if preloaded is not None and name == self.models.default:
                segmenter = preloaded
            else:
                segmenter = load_segmenter(settings, weights)
            metrics.add_device_memory(segmenter.memory_stats)
            return LoadedModel(name, segmenter, settings, metrics)

        def loaded(name: str, on_device: bool) -> None:
            metrics.model_loaded.labels(name).set(1 if on_device else 0)

        self.models = ModelRepository(settings, load, discover(settings), loaded)
        self.batcher = TileBatcher(
            None,
            lambda: 1,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_tiles=settings.max_queue_tiles,
            metrics=metrics,
        )
        self.state = State.starting

    # The default model, which is loaded from the start to the end: what a service of one
    # model (and its tests) speaks of.
    @property
    def model(self) -> LoadedModel:
        return self.models.loaded()

    @property
    def model_name(self) -> str:
        return self.models.default

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def segmenter(self) -> TiledModel:
        return self.model.segmenter

    @property
    def runner(self) -> BatchRunner:
        return self.model.runner

    @property
    def ready(self) -> bool:
        return self.state is State.ready

    def model_index(self) -> list[dict[str, str]]:
        """Every model with its state, as the repository index lists them; while the service
        starts or drains, no model takes work, so none is READY."""
        rows = self.models.index()
        if self.ready:
            return rows
        return [
            {**row, "state": "UNAVAILABLE", "reason": "loading or shutting down"}
            if row["state"] == "READY"
            else row
            for row in rows
        ]

    async def start(self) -> None:
        """Load and warm up the default model (every tile size, and for compiled graphs
        every batch shape), then start the worker and report ready."""
        started = time.monotonic()
        await self.models.load_default()
        self.batcher.start()
        self._set_state(State.ready)
        seg, info = self.segmenter, self.info
        log.info(
            "model %r ready on %s (%s, %s) in %.1f s: %s, tile sizes %s, batch <= %d "
            "tiles; %d model(s) served",
            self.model_name,
            seg.device,
            seg.backend.name,
            seg.precision,
            time.monotonic() - started,
            seg.geometry,
            "/".join(map(str, info.tile_sizes)),
            self.runner.max_batch,
            len(self.models.names),
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

    def submit(self, model: LoadedModel, entry: TiledImage | TileGroup) -> QueuedImage:
        """Queue a request's planned image or stack for `model`, or refuse at once
        (QueueFullError, TooManyTilesError, ShuttingDownError)."""
        self.check_available()  # the state may have changed while the image was planned
        return self.batcher.submit(entry, lane=model.lane)

    def submit_background(self, model: LoadedModel, image: TiledImage | TileGroup) -> QueuedImage:
        """Queue a section job's page (prepared and planned by the job): computed when no
        request's tiles wait (see serving.batcher)."""
        return self.batcher.submit(image, background=True, lane=model.lane)

    def label(self, model: LoadedModel, pages: list[Segmentation]) -> list[np.ndarray]:
        """(H, W) uint32 cell labels of each page (its probabilities kept); each page is
        labelled on its own (ids start at 1 on every page). Blocking."""
        check_instances(self.settings, model.info.out_channels)
        return [model.segmenter.instances(page.probabilities) for page in pages]
