"""Training crops with the U-Net paper's augmentation: mirror-extrapolated borders, smooth
random elastic deformations (random displacements on a coarse grid, interpolated bicubically),
flips / 90-degree rotations, and intensity jitter.

Image, label and loss weights of one crop are warped by the *same* displacement field (image
and weights linearly, labels by nearest neighbour so they stay 0/1), and flipped/rotated
together; the output window is the centre of the input window, so they stay aligned."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unet_service.core.geometry import Geometry
from unet_service.core.tiling import mirror_pad


def displacement_field(
    size: int, rng: np.random.Generator, sigma: float = 10.0, grid: int = 3
) -> np.ndarray:
    """(2, size, size) per-pixel displacements: N(0, sigma^2) vectors on a grid x grid lattice
    spanning the window, interpolated bicubically (paper: 3x3 grid, 10 px)."""
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    pos = np.linspace(0, grid - 1, size)
    rr, cc = np.meshgrid(pos, pos, indexing="ij")
    return np.stack([ndimage.map_coordinates(c, [rr, cc], order=3, mode="nearest") for c in coarse])


def warp(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Sample a 2-D array at (2, h, w) fractional coordinates, mirror-reflecting outside."""
    return ndimage.map_coordinates(array, coords, order=order, mode="mirror", prefilter=False)


def jitter_intensity(x: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Random contrast, brightness and gamma on [0, 1] intensities, plus a little noise."""
    if amount <= 0:
        return x
    gain = 1 + rng.uniform(-amount, amount)
    shift = rng.uniform(-amount, amount)
    gamma = np.exp(rng.uniform(-amount, amount))
    x = np.clip(x, 0, 1) ** gamma * gain + shift
    return x + rng.normal(0, amount / 5, size=x.shape).astype(np.float32)


@dataclass
class Crop:
    image: np.ndarray  # (S, S) float32 in [0, 1] (before normalisation)
    label: np.ndarray  # (o, o) float32 0/1
    weight: np.ndarray  # (o, o) float32


class CropSampler:
    """Random (input S x S, output o x o) training crops from whole slices.

    Slices are mirror-padded once by the network margin plus headroom for the displacements,
    so crops near the edges see the mirrored context that overlap-tile inference also uses."""

    def __init__(
        self,
        images: list[np.ndarray],
        labels: list[np.ndarray],
        weights: list[np.ndarray] | None,
        geometry: Geometry,
        output_size: int,
        elastic_sigma: float = 10.0,
        elastic_grid: int = 3,
        jitter: float = 0.1,
        flips: bool = True,
    ) -> None:
        geometry.check_output(output_size)
        if not images or len(images) != len(labels):
            raise ValueError("need as many labels as images, and at least one")
        self.geometry = geometry
        self.output_size = output_size
        self.input_size = output_size + geometry.shrink
        self.elastic_sigma = elastic_sigma
        self.elastic_grid = elastic_grid
        self.jitter = jitter
        self.flips = flips
        self.pad = geometry.margin + int(np.ceil(4 * elastic_sigma)) + 1
        p = self.pad
        self.images = [mirror_pad(im.astype(np.float32), p, p, p, p) for im in images]
        self.labels = [mirror_pad(lb.astype(np.float32), p, p, p, p) for lb in labels]
        ws = weights if weights is not None else [np.ones_like(lb, np.float32) for lb in labels]
        self.weights = [mirror_pad(w.astype(np.float32), p, p, p, p) for w in ws]
        self.shapes = [im.shape for im in images]

    def sample(self, rng: np.random.Generator) -> Crop:
        i = int(rng.integers(len(self.images)))
        h, w = self.shapes[i]
        o = self.output_size
        # Output windows may reach past the slice edge by up to half a window: the mirrored
        # labels there are as valid as the mirrored image.
        row = int(rng.integers(-o // 2, max(h - o // 2, -o // 2 + 1)))
        col = int(rng.integers(-o // 2, max(w - o // 2, -o // 2 + 1)))
        return self.crop_at(i, row, col, rng)

    def crop_at(self, i: int, row: int, col: int, rng: np.random.Generator) -> Crop:
        """The crop whose output window starts at (row, col) of slice i, in slice pixels."""
        s, o, m = self.input_size, self.output_size, self.geometry.margin
        base = np.arange(s, dtype=np.float64) - m + self.pad
        rr, cc = np.meshgrid(base + row, base + col, indexing="ij")
        coords = np.stack([rr, cc])
        if self.elastic_sigma > 0:
            coords += displacement_field(s, rng, self.elastic_sigma, self.elastic_grid)
        inner = coords[:, m : m + o, m : m + o]
        image = warp(self.images[i], coords, order=1)
        label = warp(self.labels[i], inner, order=0)
        weight = warp(self.weights[i], inner, order=1)
        image = jitter_intensity(image, rng, self.jitter)
        if self.flips:
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            image, label, weight = (_orient(a, k, flip) for a in (image, label, weight))
        return Crop(
            np.ascontiguousarray(image, np.float32),
            np.ascontiguousarray(label, np.float32),
            np.ascontiguousarray(weight, np.float32),
        )


def _orient(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a
