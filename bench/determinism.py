"""How far results move with batch composition and with tiling, per precision and backend:
the tolerances docs/inference.md quotes come from here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet_service.core.engine import Segmenter


@dataclass
class Determinism:
    backend: str
    precision: str
    batch_max_diff: float  # a tile alone vs the same tile among 7 others
    batch_mask_agreement: float
    tiled_max_diff: float  # stitched tiles vs one pass over the whole padded image
    tiled_mask_agreement: float
    fp32_mask_agreement: float  # this precision's mask vs the fp32 one


def measure(seg: Segmenter, fp32: Segmenter, image: np.ndarray, tile_size: int) -> Determinism:
    """image: (H, W, C) with at least 8 tiles of `tile_size`."""
    prepared = seg.prepare(image)
    h, w = prepared.shape[:2]
    plan = seg.plan(h, w, tile_size)
    tiles = np.stack([seg.tile_input(plan, prepared, t) for t in list(plan)[:8]])
    together = seg.forward(tiles)
    alone = np.concatenate([seg.forward(tiles[i : i + 1]) for i in range(len(tiles))])

    tiled = seg.segment(image, tile_size=tile_size, probabilities=True)
    canvas = seg.normalize(plan.padded_image(prepared).transpose(2, 0, 1))[None]
    whole = seg.forward(canvas)[0][:, :h, :w]
    reference = fp32.segment(image, tile_size=tile_size).mask
    return Determinism(
        seg.backend.name,
        seg.precision,
        float(np.abs(alone - together).max()),
        float((seg.to_mask(alone) == seg.to_mask(together)).mean()),
        float(np.abs(tiled.probabilities - whole).max()),
        float((tiled.mask == seg.to_mask(whole)).mean()),
        float((tiled.mask == reference).mean()),
    )
