"""Pixel normalisation, defined once for serving and training: pixels are scaled to [0, 1] by
their type's range (uint8 / 255, uint16 / 65535; floats are taken as already in [0, 1]),
then standardised per channel with the model card's mean and std. Training normalises its
crops with this same code, so a model sees at inference exactly the inputs it learned on."""

from __future__ import annotations

import numpy as np

from unet_service.core.weights import Normalization

_SCALE = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535}


def unit_scale(dtype: np.dtype) -> float:
    """The factor that brings pixels of `dtype` to the [0, 1] scale (1 for floats)."""
    return _SCALE.get(np.dtype(dtype), 1.0)


def to_unit(raw: np.ndarray) -> np.ndarray:
    """Pixels in their own dtype -> float32 on the [0, 1] scale, any shape."""
    return raw.astype(np.float32) * np.float32(unit_scale(raw.dtype))


class Normalizer:
    """A card's normalisation as a function of channel-first pixels: (..., C, H, W) in their
    own dtype -> float32 (x - mean) / std. One mean/std value applies to every channel."""

    def __init__(self, normalization: Normalization, channels: int) -> None:
        def per_channel(values: list[float]) -> np.ndarray:
            return np.broadcast_to(np.asarray(values, np.float32), (channels,))[:, None, None]

        self.mean = per_channel(normalization.mean)
        # Multiplying by the reciprocal is cheaper than dividing, on every pixel of every tile.
        self.inv_std = 1 / per_channel(normalization.std)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return ((to_unit(raw) - self.mean) * self.inv_std).astype(np.float32, copy=False)
