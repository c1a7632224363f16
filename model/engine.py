"""The inference engine shared by the CLI and the service: a loaded UNet on its device, tile
preparation (normalisation) and batched forward passes returning probabilities."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.backends import Backend, make_backend
from model.geometry import Geometry
from model.imageio import ImageError, match_channels
from model.normalize import Normalizer
from model.precision import Precision, resolve_precision
from model.tiling import Stitcher, Tile, TilePlan
from model.unet import UNet
from model.weights import ModelCard, load_weights

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "isbi2012.safetensors"
# 516 = 4 + 16 * 32: one tile holds a 512x512 slice, and its margins cost less per output
# pixel than 388's (measured ~17% more output megapixels/s on the shipped model).
DEFAULT_TILE_SIZE = 516

# Float pixels are meant to lie in [0, 1]. Far beyond that (float32 reaches 3.4e38) the
# normalisation overflows and every probability becomes NaN; such images are refused with
# a clear error instead of coming back as an all-zero mask.
MAX_FLOAT_PIXEL = 1e30


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass
class Segmentation:
    mask: np.ndarray  # (H, W) uint8: 0/1 for one class, class index for several
    probabilities: np.ndarray | None  # (K, H, W) float32, when asked for


class Segmenter:
    """A UNet in eval mode on one device. Thread-compatible, not thread-safe: one owner
    (the CLI loop or the service's inference worker) calls `forward`."""

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

    @property
    def out_channels(self) -> int:
        return self.card.out_channels

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Decoded (H, W, C) image -> (H, W, in_channels), still in its own dtype."""
        prepared = match_channels(image, self.card.in_channels)
        if prepared.dtype.kind == "f" and prepared.size:
            lo, hi = float(prepared.min()), float(prepared.max())  # no |x| copy of the image
            if not -MAX_FLOAT_PIXEL <= lo <= hi <= MAX_FLOAT_PIXEL:
                raise ImageError(
                    f"float pixel values must be finite and within +-{MAX_FLOAT_PIXEL:g} "
                    f"(this model expects them in [0, 1]); found {lo:g} .. {hi:g}"
                )
        return prepared

    def plan(self, height: int, width: int, tile_size: int | None = None) -> TilePlan:
        return TilePlan(height, width, self.geometry, tile_size or DEFAULT_TILE_SIZE)

    def tile_input(self, plan: TilePlan, image: np.ndarray, tile: Tile) -> np.ndarray:
        """The normalised float32 (C, S, S) input of one tile."""
        return self.normalize(plan.extract(image, tile))

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """(C, H, W) pixels in their own dtype -> normalised float32, as the card says."""
        return self._normalizer(raw)

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) normalised float32 tiles -> (N, K, S', S') float32 probabilities."""
        logits = self.backend(batch)
        probs = torch.sigmoid(logits) if self.out_channels == 1 else torch.softmax(logits, 1)
        return probs.cpu().numpy()

    def to_mask(self, probabilities: np.ndarray) -> np.ndarray:
        """(K, ...) probabilities -> (...) uint8 mask: 0/1 at the card's threshold for one
        class, the arg-max class index for several."""
        if probabilities.shape[0] == 1:
            return (probabilities[0] > self.card.threshold).astype(np.uint8)
        return probabilities.argmax(axis=0).astype(np.uint8)

    def segment(
        self,
        image: np.ndarray,
        tile_size: int | None = None,
        batch_size: int = 4,
        probabilities: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> Segmentation:
        """Segment one decoded (H, W, C) image by overlap tiles, `batch_size` tiles per pass.
        Tiles are cut and consumed lazily, so memory stays bounded for huge images."""
        image = self.prepare(image)
        plan = self.plan(image.shape[0], image.shape[1], tile_size)
        mask = Stitcher(plan, 1, np.uint8)
        probs = Stitcher(plan, self.out_channels, np.float32) if probabilities else None
        for tiles in batched(plan, batch_size):
            batch = np.stack([self.tile_input(plan, image, t) for t in tiles])
            out = self.forward(batch)
            for tile, values in zip(tiles, out, strict=True):
                mask.aggregate(self.to_mask(values)[None], tile)
                if probs is not None:
                    probs.aggregate(values, tile)
            if on_batch is not None:
                on_batch(len(tiles))
        return Segmentation(mask.finalize()[0], probs.finalize() if probs is not None else None)


def batched(items: Iterable[Tile], n: int) -> Iterator[tuple[Tile, ...]]:
    if n < 1:
        raise ValueError("batch size must be >= 1")
    it = iter(items)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk
