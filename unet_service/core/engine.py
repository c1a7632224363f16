"""The inference engine shared by the CLI and the service: a loaded UNet on its device, tile
preparation (normalisation) and batched forward passes returning probabilities. `TiledModel`
is what every served model has in common (its recipe, warm-up, mask and instances), so that
a bioimage.io package (`zoo.segmenter.PackageSegmenter`) is served the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_service.core.backends import Backend, make_backend
from unet_service.core.geometry import Geometry, TileGeometry
from unet_service.core.normalize import Normalizer
from unet_service.core.precision import Precision, resolve_precision
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.core.tiling import TilePlan
from unet_service.core.unet import UNet, to_probabilities
from unet_service.core.weights import ModelCard, load_weights
from unet_service.imaging.decode import match_channels
from unet_service.imaging.sources import Source
from unet_service.options import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS
from unet_service.pipeline.instances import InstanceParams, label_instances
from unet_service.pipeline.recipe import Recipe
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import AveragedViews, TiledImage

__all__ = [
    "DEFAULT_TILE_SIZE",
    "DEFAULT_WEIGHTS",
    "Segmentation",
    "Segmenter",
    "TiledModel",
    "resolve_device",
]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


class TiledModel:
    """A network on one device, served by overlap tiles. Subclasses set `device`,
    `geometry`, `backend`, `in_channels`, `out_channels`, `threshold` and `instance_params`,
    and implement `normalize` and `forward`; a model whose normalisation needs statistics of
    the whole image sets `measure` (see `pipeline.recipe.Recipe`). Thread-compatible, not
    thread-safe: one owner (the CLI loop or the service's inference worker) calls `forward`."""

    device: torch.device
    geometry: TileGeometry
    backend: Backend
    in_channels: int
    out_channels: int
    threshold: float
    instance_params: InstanceParams | None = None
    measure: Callable[[Source, int], Any] | None = None

    def normalize(self, raw: np.ndarray, statistics: Any = None) -> np.ndarray:
        """(C, H, W) pixels in their own dtype -> the network's float32 input."""
        raise NotImplementedError

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) normalised tiles -> (N, K, S', S') float32 probabilities."""
        raise NotImplementedError

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Decoded (H, W, C) image -> (H, W, in_channels), still in its own dtype."""
        return match_channels(image, self.in_channels)

    def recipe(self, tile_sizes: int | tuple[int, ...] | None = None) -> Recipe:
        """How this model tiles images: with one tile size, that size (as the geometry takes
        it); with several, the one that computes each image with the least work."""
        if isinstance(tile_sizes, tuple):
            sizes = tile_sizes
        else:
            sizes = (self.geometry.tile_for(tile_sizes or DEFAULT_TILE_SIZE),)
        return Recipe(
            self.geometry, sizes, self.in_channels, self.out_channels, self.to_mask, self.measure
        )

    def plan(self, height: int, width: int, tile_size: int | None = None) -> TilePlan:
        return self.recipe(tile_size).plan(height, width)

    def tiled(
        self,
        image: np.ndarray,
        tile_sizes: int | tuple[int, ...] | None = None,
        probabilities: bool = False,
        tta: int = 1,
    ) -> TiledImage | AveragedViews:
        """A decoded (H, W, C) image, prepared and planned (see `recipe`), answered in
        memory. `tta=8` averages the 8 rotations and mirrorings of the image."""
        recipe = self.recipe(tile_sizes)
        entry = recipe.for_images([image], probabilities=probabilities, tta=tta)
        assert isinstance(entry, TiledImage | AveragedViews)  # one page
        return entry

    def warm_up(self, tile_sizes: Iterable[int], max_batch: int) -> int:
        """One pass per tile size and per batch shape the backend will see for batches of
        up to `max_batch` tiles (kernel selection, allocator pools, compiled graphs), so
        nothing is compiled or tuned during live traffic. Returns the passes run."""
        passes = 0
        for size in tile_sizes:
            side = self.geometry.input_for_output(size)
            for n in self.backend.batch_shapes(max_batch):
                self.forward(np.zeros((n, self.in_channels, side, side), np.float32))
                passes += 1
        return passes

    def to_mask(self, probabilities: np.ndarray) -> np.ndarray:
        """(K, ...) probabilities -> (...) uint8 mask: 0/1 at the threshold for one class,
        the arg-max class index for several."""
        if probabilities.shape[0] == 1:
            return (probabilities[0] > self.threshold).astype(np.uint8)
        return probabilities.argmax(axis=0).astype(np.uint8)

    def instances(self, probabilities: np.ndarray) -> np.ndarray:
        """(1, H, W) or (H, W) probabilities of a one-class model -> (H, W) uint32 cell
        labels by the seeded watershed (pipeline.instances)."""
        if self.out_channels != 1:
            raise ValueError("instances need a one-class model (foreground probabilities)")
        prob = probabilities[0] if probabilities.ndim == 3 else probabilities
        return label_instances(prob, self.threshold, self.instance_params)

    def memory_stats(self) -> dict[str, int] | None:
        """Bytes of device memory (allocated, reserved, peak) on a CUDA device; None on a
        CPU, where the process's own memory is what counts."""
        if self.device.type != "cuda":
            return None
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return {
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "peak": torch.cuda.max_memory_allocated(index),
        }

    def segment(
        self,
        image: np.ndarray,
        tile_size: int | None = None,
        batch_size: int = 4,
        probabilities: bool = False,
        on_batch: Callable[[int], None] | None = None,
        tta: int = 1,
    ) -> Segmentation:
        """Segment one decoded (H, W, C) image by overlap tiles, `batch_size` tiles per pass.
        Tiles are cut and consumed lazily, so memory stays bounded for huge images."""
        tiled = self.tiled(image, tile_size, probabilities, tta)
        run_tiles(tiled, BatchRunner(self, batch_size), on_batch)
        return tiled.result()


class Segmenter(TiledModel):
    """A UNet of ours (weights and model card) in eval mode on one device."""

    def __init__(
        self,
        model: UNet,
        card: ModelCard,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        backend: str | Backend = "auto",
        compile: bool = False,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.card = card
        self.precision: Precision = resolve_precision(precision, self.device, card.precision)
        self.geometry = Geometry(card.depth)
        self.model = model.to(self.device).eval()  # unfused, for reference passes
        self._param_dtype = next(self.model.parameters()).dtype
        if not isinstance(backend, str):
            # A runtime built by the caller, e.g. training's, which runs the live weights.
            self.backend = backend
        else:
            if self._param_dtype != torch.float32:
                backend = "torch"  # float64 models check exactness; only torch runs them
            self.backend = make_backend(
                backend, self.model, self.device, self.precision, card.in_channels, compile
            )
        self._normalizer = Normalizer(card.normalization, card.in_channels)

    @classmethod
    def from_weights(
        cls,
        path: str | Path = DEFAULT_WEIGHTS,
        device: str = "auto",
        precision: str = "fp32",
        backend: str = "auto",
        compile: bool = False,
    ) -> Segmenter:
        model, card = load_weights(path)
        return cls(model, card, device, precision, backend, compile)

    # Read from the card, which training and unet-eval update in place.
    @property
    def in_channels(self) -> int:  # type: ignore[override]
        return self.card.in_channels

    @property
    def out_channels(self) -> int:  # type: ignore[override]
        return self.card.out_channels

    @property
    def threshold(self) -> float:  # type: ignore[override]
        return self.card.threshold

    @property
    def instance_params(self) -> InstanceParams | None:  # type: ignore[override]
        return self.card.instances

    def tile_input(self, plan: TilePlan, image: np.ndarray, tile) -> np.ndarray:
        """The normalised float32 (C, S, S) input of one tile of a prepared image."""
        return self.normalize(plan.extract(image, tile))

    def normalize(self, raw: np.ndarray, statistics: Any = None) -> np.ndarray:
        """(C, H, W) pixels in their own dtype -> normalised float32, as the card says (our
        models need no statistics of the image)."""
        return self._normalizer(raw)

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) normalised float32 tiles -> (N, K, S', S') float32 probabilities."""
        return to_probabilities(self.backend(batch)).cpu().numpy()
