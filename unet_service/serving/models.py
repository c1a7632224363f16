"""The models the service serves, by name: a repository (`UNET_MODELS`: a folder where each
model is `NAME.safetensors` + `NAME.json`, or a bioimage.io package, see `serving.catalog`;
or, without it, the one `UNET_WEIGHTS` names), each model loaded on the device on demand,
at most `UNET_MAX_LOADED_MODELS` at once (the least recently used one that no request holds
is unloaded first), and its state for the repository index: READY, LOADING, UNAVAILABLE (not
loaded), or FAILED with the reason (from the start, for a package the service cannot serve),
while the others keep serving. The default model is loaded at start and stays loaded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from unet_service.core.engine import Segmenter, TiledModel
from unet_service.core.runner import BatchRunner
from unet_service.errors import NotFoundError, UnavailableError
from unet_service.pipeline.recipe import Recipe
from unet_service.serving.catalog import (
    ModelInfo,
    default_model,
    info_of,
    model_info,
    package_info,
    refusal,
)
from unet_service.serving.metrics import Metrics
from unet_service.serving.queued import Lane
from unet_service.settings import Settings
from unet_service.zoo.package import PackageError

log = logging.getLogger("unet_service.serving.models")


class LoadedModel:
    """One model on the device: its engine, how it tiles images, its batch runner (and lane
    in the batcher), and what is shown of it."""

    def __init__(
        self, name: str, segmenter: TiledModel, settings: Settings, metrics: Metrics
    ) -> None:
        settings.check_tile_size(segmenter.geometry)
        self.name = name
        self.segmenter = segmenter
        if isinstance(segmenter, Segmenter):
            self.info = model_info(name, segmenter.card, settings)
        else:
            self.info = package_info(name, segmenter.package, settings)
        self.recipe: Recipe = segmenter.recipe(self.info.tile_sizes)
        for family in (metrics.tiles, metrics.forward_passes, metrics.oom_splits):
            family.labels(name)  # each model's series from 0, before its first pass
        device = segmenter.device.type
        self.runner = BatchRunner(
            segmenter,
            settings.batch_tiles_for(device),
            on_oom_split=metrics.oom_splits.labels(name).inc,
        )
        self.lane = Lane(
            name,
            self.runner,
            lambda: self.runner.limit,
            lambda: min(self.runner.limit, settings.job_batch_tiles_for(device)),
        )

    def warm_up(self) -> None:
        """One pass per tile size and batch shape (blocking), so that nothing is compiled
        or tuned during live traffic."""
        self.segmenter.warm_up(self.info.tile_sizes, self.runner.max_batch)


@dataclass
class ModelEntry:
    """A model of the repository, loaded or not."""

    name: str
    weights: Path
    state: str = "UNAVAILABLE"  # READY, LOADING, UNAVAILABLE or FAILED
    reason: str | None = None
    loaded: LoadedModel | None = None
    users: int = 0  # requests and jobs holding it: it is not unloaded under them
    last_used: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


Loader = Callable[[str, Path], LoadedModel]


class ModelRepository:
    """The service's models. `get` is how a request or a job takes one (loading it when it
    is not loaded); `hold` keeps it loaded while it is used."""

    def __init__(
        self,
        settings: Settings,
        loader: Loader,
        models: dict[str, Path],
        on_change: Callable[[str, bool], None] = lambda name, loaded: None,
    ) -> None:
        self.settings = settings
        self._load_model = loader
        self._on_change = on_change
        self.entries = {name: ModelEntry(name, path) for name, path in models.items()}
        for entry in self.entries.values():
            reason = refusal(entry.weights)  # a package that cannot be served: FAILED at once
            if reason is not None:
                entry.state, entry.reason = "FAILED", reason
        self.default = default_model(settings, models)
        self._uses = itertools.count(1)
        for name in self.entries:
            on_change(name, False)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str | None) -> ModelEntry:
        """The entry of model `name` (None: the default), or NotFoundError naming them all."""
        entry = self.entries.get(self.default if name is None else name)
        if entry is None:
            served = ", ".join(map(repr, self.entries))
            raise NotFoundError(f"model {name!r} not found; this server serves {served}")
        return entry

    def info(self, name: str) -> ModelInfo:
        """What is shown of model `name`, loaded or not (from its card or package; a package
        that cannot be served is unavailable, with the reason)."""
        entry = self.entry(name)
        if entry.loaded is not None:
            return entry.loaded.info
        try:
            return info_of(entry.name, entry.weights, self.settings)
        except ValueError as e:  # a broken or missing card (WeightsError), a bad depth, or a
            # package that cannot be served (PackageError)
            if entry.state != "LOADING":
                entry.state, entry.reason = "FAILED", str(e)
            raise UnavailableError(f"model {entry.name!r} cannot be served: {e}") from None

    def loaded(self, name: str | None = None) -> LoadedModel:
        """A model that is loaded now (the default one always is, once started)."""
        entry = self.entry(name)
        if entry.loaded is None:
            raise UnavailableError(f"model {entry.name!r} is not loaded", retry_after=5)
        return entry.loaded

    async def get(self, name: str | None) -> LoadedModel:
        """Model `name` (None: the default), loaded now if it is not."""
        entry = self.entry(name)
        entry.last_used = next(self._uses)
        if entry.loaded is None:
            await self.load(entry.name)
        assert entry.loaded is not None
        return entry.loaded

    @contextlib.asynccontextmanager
    async def hold(self, name: str | None) -> AsyncIterator[LoadedModel]:
        """Model `name`, kept loaded for as long as the block runs."""
        entry = self.entry(name)
        entry.users += 1
        try:
            yield await self.get(entry.name)
        finally:
            entry.users -= 1

    async def load(self, name: str) -> None:
        """Load model `name` (FAILED with the reason when it cannot be), making room first:
        beyond UNET_MAX_LOADED_MODELS the least recently used idle model is unloaded."""
        entry = self.entry(name)
        try:
            await self._load(entry)
        except Exception as e:
            raise UnavailableError(f"model {entry.name!r} failed to load: {e}") from None

    async def load_default(self) -> None:
        """Load the default model at start; its own error (a wrong setting, a broken file)
        stops the start with its own message."""
        await self._load(self.entry(None))

    async def _load(self, entry: ModelEntry) -> None:
        async with entry.lock:
            if entry.loaded is not None:
                return
            reason = refusal(entry.weights)  # known (and kept) without loading: takes no room
            if reason is not None:
                entry.state, entry.reason = "FAILED", reason
                raise PackageError(reason)
            self._make_room(entry)
            entry.state, entry.reason = "LOADING", None
            try:
                model = await asyncio.to_thread(self._load_model, entry.name, entry.weights)
                await asyncio.to_thread(model.warm_up)
            except Exception as e:
                entry.state, entry.reason = "FAILED", str(e) or type(e).__name__
                log.error("model %r failed to load: %s", entry.name, entry.reason)
                raise
            entry.loaded, entry.state = model, "READY"
            self._on_change(entry.name, True)
            log.info(
                "model %r loaded (%d of at most %d)", entry.name, len(self._ready()), self._cap
            )

    async def unload(self, name: str) -> None:
        """Unload model `name` once no request or job holds it (the default one stays)."""
        entry = self.entry(name)
        if entry.name == self.default:
            raise UnavailableError(f"model {name!r} is the default model and stays loaded")
        async with entry.lock:
            self._drop(entry)

    def index(self) -> list[dict[str, str]]:
        """Every model with its state (Triton's repository index)."""
        rows = []
        for entry in self.entries.values():
            row = {"name": entry.name, "version": "1", "state": entry.state}
            if entry.reason:
                row["reason"] = entry.reason
            rows.append(row)
        return rows

    @property
    def _cap(self) -> int:
        return self.settings.max_loaded_models

    def _ready(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if e.loaded is not None]

    def _make_room(self, entry: ModelEntry) -> None:
        while len(self._ready()) >= self._cap:
            idle = [e for e in self._ready() if e.users == 0 and e.name != self.default]
            if not idle:
                raise UnavailableError(
                    f"model {entry.name!r} cannot be loaded now: {self._cap} models are loaded "
                    "and in use (UNET_MAX_LOADED_MODELS)",
                    retry_after=5,
                )
            self._drop(min(idle, key=lambda e: e.last_used))

    def _drop(self, entry: ModelEntry) -> None:
        if entry.users:
            raise UnavailableError(f"model {entry.name!r} is in use", retry_after=5)
        if entry.loaded is not None:
            entry.loaded = None
            self._on_change(entry.name, False)
            log.info("model %r unloaded", entry.name)
        entry.state, entry.reason = "UNAVAILABLE", None
