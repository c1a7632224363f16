"""Benchmark inputs built from real EM data: the ISBI 2012 test slices, and larger or smaller
images cut from mirror-tiled slices (real texture at every size)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unet_service.core.tiling import mirror_pad

REPO = Path(__file__).resolve().parent.parent
ISBI_TEST = REPO.parent / "shared" / "data" / "isbi2012" / "test"

# (height, width) of the mixed workload, smallest to largest.
MIXED_SIZES = [(64, 64), (200, 300), (512, 512), (700, 1000), (2048, 2048), (3000, 4000)]


@dataclass(frozen=True)
class Upload:
    name: str
    height: int
    width: int
    png: bytes

    @property
    def pixels(self) -> int:
        return self.height * self.width


def isbi_slices() -> list[np.ndarray]:
    paths = sorted(ISBI_TEST.glob("*.png"))
    if not paths:
        raise SystemExit(f"bench: error: no ISBI test slices under {ISBI_TEST}")
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def em_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An EM image of any size: a test slice, mirror-tiled outwards, then cropped."""
    slices = isbi_slices()
    base = slices[seed % len(slices)]
    pad_h, pad_w = max(0, height - 512), max(0, width - 512)
    return mirror_pad(base, 0, pad_h, 0, pad_w)[:height, :width]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def isbi_uploads() -> list[Upload]:
    return [Upload(f"isbi-{i:02d}", 512, 512, png_bytes(s)) for i, s in enumerate(isbi_slices())]


def mixed_uploads(max_pixels: int | None = None) -> list[Upload]:
    out = []
    for i, (h, w) in enumerate(MIXED_SIZES):
        if max_pixels is None or h * w <= max_pixels:
            out.append(Upload(f"mixed-{h}x{w}", h, w, png_bytes(em_image(h, w, seed=i))))
    return out
