"""A result's multiscale pyramid, each level from the one above it, a region of whole chunks at
a time (memory stays bounded at any size): y and x halve, z and classes stay. Labels take
the nearest pixel (the top-left of each 2 x 2), so every id of a level is an id of the full
resolution; probabilities the mean of each 2 x 2 (the edge pixel repeated where a side is
odd). Each level region is a pure function of the level above, so an interrupted pyramid is
simply built again."""

from __future__ import annotations

import numpy as np

from unet_service.imaging.zarr_result import ZarrResult

# Level pixels per region written (y and x rounded to whole chunks): about 16 MiB of float32.
REGION_SIDE = 2048


def downsample(data: np.ndarray, labels: bool) -> np.ndarray:
    """(..., Y, X) -> (..., ceil(Y/2), ceil(X/2)): nearest for labels, else the mean."""
    if labels:
        return np.ascontiguousarray(data[..., ::2, ::2])
    height, width = data.shape[-2:]
    pad = [(0, 0)] * (data.ndim - 2) + [(0, height % 2), (0, width % 2)]
    even = np.pad(data, pad, mode="edge") if height % 2 or width % 2 else data
    pairs = even.reshape(*even.shape[:-2], even.shape[-2] // 2, 2, even.shape[-1] // 2, 2)
    return pairs.mean(axis=(-3, -1), dtype=np.float64).astype(data.dtype)


def build_pyramid(result: ZarrResult) -> None:
    """Levels 1.. of `result` from its full resolution (blocking)."""
    spec = result.spec
    chunks = dict(zip(spec.names, spec.chunks, strict=True))
    depth = chunks.get("z", 1)
    step_y = max(1, REGION_SIDE // chunks["y"]) * chunks["y"]
    step_x = max(1, REGION_SIDE // chunks["x"]) * chunks["x"]
    for level in range(1, spec.levels):
        shape = dict(zip(spec.names, spec.level_shape(level), strict=True))
        pages = shape.get("z", 1)
        for z0 in range(0, pages, depth):
            z1 = min(pages, z0 + depth)
            for y0 in range(0, shape["y"], step_y):
                rows = slice(2 * y0, 2 * min(shape["y"], y0 + step_y))
                for x0 in range(0, shape["x"], step_x):
                    cols = slice(2 * x0, 2 * min(shape["x"], x0 + step_x))
                    above = result.read(z0, z1, rows, cols, level - 1)
                    result.write(z0, y0, x0, downsample(above, spec.labels), level)
