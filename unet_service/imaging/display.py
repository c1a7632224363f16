"""How images and results are shown: the display stretch and the class colours of the overlay
(imaging.encode), and the renderings of `POST /v1/preview` for the web page: an image as the
overlay shows it, or a mask's classes or the cell instances in the overlay's colours over
transparency, each scaled down for display."""

from __future__ import annotations

import numpy as np
from PIL import Image

from unet_service.imaging.decode import TIFF_MAGIC, ImageError
from unet_service.imaging.pages import stored_page

ROW_BLOCK = 1024
# Colours for classes 1, 2, ...; class 0 (background, or membrane for ISBI) stays untinted.
PALETTE = np.array(
    [
        [255, 64, 64],
        [64, 160, 255],
        [255, 200, 0],
        [0, 200, 120],
        [200, 80, 255],
        [255, 128, 0],
        [0, 220, 220],
        [255, 0, 160],
    ],
    dtype=np.float32,
)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours, one fixed bright colour per id (a
    golden-ratio walk round the hue circle, so neighbours differ), black for 0."""
    ids = np.arange(int(labels.max()) + 1 if labels.size else 1, dtype=np.float64)
    hue = (ids * 0.618033988749895) % 1.0
    # HSV with full saturation and value, to RGB.
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    table = np.rint(55 + 200 * rgb).astype(np.uint8)
    table[0] = 0
    return table[labels]


def display_range(image: np.ndarray) -> tuple[float, float]:
    """8-bit is shown as is; 16-bit and float images are stretched from their min to their
    max, since such data (EM, fluorescence) often uses a narrow part of its range."""
    if image.dtype == np.uint8:
        return 0.0, 255.0
    return float(image.min()), float(image.max())


def stretched(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Pixels mapped from [lo, hi] (display_range) onto [0, 255], as float32, unrounded."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((block.astype(np.float32) - lo) * scale, 0, 255)


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled down, never up, so that the longer side is at most max_side."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def image_view(image: np.ndarray, max_side: int) -> np.ndarray:
    """An (H, W, C) image as the overlay shows it, (h, w) grey or (h, w, 3) RGB uint8:
    stretched for display (display_range), then scaled down to `max_side` by averaging the
    pixels each one covers."""
    lo, hi = display_range(image)
    height, width, channels = image.shape
    grey = channels == 1
    out = np.empty((height, width) if grey else (height, width, 3), np.uint8)
    for r in range(0, height, ROW_BLOCK):
        block = stretched(image[r : r + ROW_BLOCK], lo, hi)
        out[r : r + ROW_BLOCK] = np.rint(block[:, :, 0] if grey else block[:, :, :3])
    size = display_size(height, width, max_side)
    if size == (height, width):
        return out
    shown = Image.fromarray(out).resize(size[::-1], Image.Resampling.BOX)
    return np.asarray(shown)


def _nearest(labels: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W) labels scaled down to `max_side` by taking the pixel under each one's centre:
    labels are ids, never averaged."""
    height, width = labels.shape
    h, w = display_size(height, width, max_side)
    if (h, w) == (height, width):
        return labels
    rows = ((np.arange(h) + 0.5) * (height / h)).astype(np.intp)
    cols = ((np.arange(w) + 0.5) * (width / w)).astype(np.intp)
    return labels[rows[:, None], cols[None, :]]


def _one_label_per_pixel(page: np.ndarray, what: str) -> np.ndarray:
    if page.shape[2] != 1 or not np.issubdtype(page.dtype, np.integer):
        raise ImageError(
            f"colour={what} renders labels: one channel of integers per pixel, as the "
            f"service's {'mask' if what == 'classes' else 'instances'} answers hold; this "
            f"page has {page.shape[2]} channel(s) of {page.dtype}"
        )
    return page[:, :, 0]


def classes_view(mask: np.ndarray, out_channels: int, max_side: int) -> np.ndarray:
    """A page of a mask answer ((H, W, 1): 0/255 for one class, the class index for several)
    as (h, w, 4) RGBA: each class > 0 opaque in its overlay colour, class 0 transparent."""
    values = _nearest(_one_label_per_pixel(mask, "classes"), max_side)
    if values.dtype != np.uint8:
        raise ImageError(
            f"colour=classes renders a mask, which is 8-bit; this page is {values.dtype}"
        )
    table = np.zeros((256, 4), np.uint8)
    table[1:, :3] = PALETTE[np.arange(255) % len(PALETTE)]
    table[1:, 3] = 255
    classes = (values > 0).astype(np.uint8) if out_channels == 1 else values
    return table[classes]


def cells_view(ids: np.ndarray, max_side: int) -> np.ndarray:
    """A page of cell ids ((H, W, 1)) as (h, w, 4) RGBA: each cell opaque in the colour the
    instance overlay gives it, 0 (background, membrane) transparent."""
    labels = _nearest(_one_label_per_pixel(ids, "instances"), max_side)
    out = np.zeros((*labels.shape, 4), np.uint8)
    out[:, :, :3] = label_colours(labels)
    out[:, :, 3] = np.where(labels > 0, 255, 0)
    return out


def cell_ids(data: bytes, decoded: np.ndarray, index: int) -> np.ndarray:
    """Page `index` of an instances upload as (H, W, 1) ids. The decoder keeps 8- and 16-bit
    ids, but maps 32-bit ones (the TIFF of a page with more than 65535 cells) onto float in
    [0, 1] as it does any 32-bit image; those are read again as they are, from the TIFF
    that the decoder has already checked (`decoded` is that page as it decoded it)."""
    if decoded.dtype != np.float32 or data[:4] not in TIFF_MAGIC:
        return decoded
    ids = stored_page(data, index)
    if ids.shape != decoded.shape or not np.issubdtype(ids.dtype, np.unsignedinteger):
        return decoded  # not one plane of ids: refused as such by cells_view
    return ids
