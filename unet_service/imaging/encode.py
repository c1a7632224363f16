"""Response bodies: mask PNG, probabilities .npy, overlay PNG; for a stack of pages, the
same as (D, H, W) TIFF volumes (imaging.tiff_volume) and an .npy with a leading page axis."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from unet_service.imaging.display import (
    PALETTE,
    ROW_BLOCK,
    display_range,
    label_colours,
    stretched,
)
from unet_service.imaging.tiff_volume import labels_bytes, volume_bytes

# Fast PNG compression: masks compress well at any level and latency matters more.
PNG_COMPRESS_LEVEL = 1
OVERLAY_ALPHA = 0.45
SEND_PIECE = 1 << 20


def mask_pixels(mask: np.ndarray, out_channels: int) -> np.ndarray:
    """A mask as every output file stores it: one class 0/255, so the file is viewable;
    several, the class index."""
    return mask * np.uint8(255) if out_channels == 1 else mask


def slices(body: bytes | memoryview, size: int = SEND_PIECE) -> Iterator[memoryview]:
    """A body as views of at most `size` bytes: the event loop copies what the socket does
    not take at once into its buffer, so one huge write would stall it for that copy."""
    view = memoryview(body).cast("B")
    for start in range(0, len(view), size):
        yield view[start : start + size]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def mask_png(mask: np.ndarray, out_channels: int) -> bytes:
    return png_bytes(Image.fromarray(mask_pixels(mask, out_channels), mode="L"))


def mask_tiff(masks: Sequence[np.ndarray], out_channels: int) -> bytes:
    """A stack's masks as one (D, H, W) 8-bit TIFF volume, each page as mask_png's pixels."""
    return volume_bytes([mask_pixels(mask, out_channels) for mask in masks])


def instances_tiff(labels: Sequence[np.ndarray]) -> bytes:
    """A stack's (H, W) uint32 labels as one (D, H, W) TIFF volume, 16-bit while the ids
    fit (see imaging.tiff_volume.labels_bytes)."""
    return labels_bytes(labels)


def probabilities_npy_pages(pages: Sequence[np.ndarray]) -> bytes:
    """A stack's (K, H, W) probabilities -> .npy bytes with a leading page axis: (D, H, W)
    for one class, (D, K, H, W) for several (probabilities_npy's shapes, per page)."""
    stacked = np.stack([page[0] if page.shape[0] == 1 else page for page in pages])
    buf = io.BytesIO()
    np.save(buf, stacked.astype(np.float32, copy=False), allow_pickle=False)
    return buf.getvalue()


def instances_image(labels: np.ndarray) -> tuple[bytes, str, str]:
    """(H, W) uint32 labels -> (bytes, media type, file name): a 16-bit PNG while the ids
    fit (most viewers open it), else a one-page 32-bit TIFF volume."""
    if labels.size == 0 or int(labels.max()) <= 0xFFFF:
        image = Image.fromarray(labels.astype(np.uint16))
        return png_bytes(image), "image/png", "instances.png"
    return labels_bytes([labels]), "image/tiff", "instances.tif"


def probabilities_npy(probabilities: np.ndarray) -> bytes:
    """(K, H, W) float32 -> .npy bytes: (H, W) for one class, (K, H, W) for several."""
    array = probabilities[0] if probabilities.shape[0] == 1 else probabilities
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def overlay_png(image: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    """RGB PNG of the (H, W, C) image in grey or colour, each non-zero class of the (H, W)
    mask tinted in its colour, or with `labels` each cell instance in a colour of its own."""
    return png_bytes(Image.fromarray(overlay_rgb(image, mask, labels), mode="RGB"))


def overlay_tiff(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
) -> bytes:
    """A stack's overlays as one (D, H, W, 3) RGB TIFF volume, each page as overlay_png's
    pixels (each page stretched for display on its own, as if sent alone)."""
    return volume_bytes(
        [
            overlay_rgb(image, mask, None if labels is None else labels[i])
            for i, (image, mask) in enumerate(zip(images, masks, strict=True))
        ],
        rgb=True,
    )


def overlay_rgb(
    image: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None
) -> np.ndarray:
    """The overlay's (H, W, 3) uint8 pixels, built in row blocks so huge images need no
    float copy."""
    lo, hi = display_range(image)
    height, width = mask.shape
    out = np.empty((height, width, 3), np.uint8)
    for r in range(0, height, ROW_BLOCK):
        block = stretched(image[r : r + ROW_BLOCK], lo, hi)
        rgb = np.repeat(block, 3, axis=2) if block.shape[2] == 1 else block[:, :, :3]
        if labels is not None:
            block_labels = labels[r : r + ROW_BLOCK]
            cells = block_labels > 0
            colours = label_colours(block_labels)[cells].astype(np.float32)
            rgb[cells] = (1 - OVERLAY_ALPHA) * rgb[cells] + OVERLAY_ALPHA * colours
            out[r : r + ROW_BLOCK] = np.rint(rgb)
            continue
        classes = mask[r : r + ROW_BLOCK]
        for cls in np.unique(classes):
            if cls == 0:
                continue
            where = classes == cls
            colour = PALETTE[(int(cls) - 1) % len(PALETTE)]
            rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * colour
        out[r : r + ROW_BLOCK] = np.rint(rgb)
    return out


class PageResult(Protocol):
    """A page's segmentation (pipeline.sinks.Segmentation)."""

    mask: np.ndarray
    probabilities: np.ndarray | None


def encode_output(
    output: str,
    images: Sequence[np.ndarray],
    pages: Sequence[PageResult],
    labels: Sequence[np.ndarray] | None,
    out_channels: int,
) -> tuple[bytes, str, str]:
    """One output of an image or stack as a file: (bytes, media type, file name). One page:
    mask and overlay PNG, probabilities .npy, instances 16-bit PNG (a 32-bit TIFF beyond
    65535 cells). D pages: (D, H, W) TIFF volumes (overlay (D, H, W, 3)), probabilities an
    .npy with a leading page axis. `labels`: each page's cell ids, for instances and an
    overlay coloured by cell."""
    masks = [page.mask for page in pages]
    stack = len(pages) > 1
    if output == "mask":
        if stack:
            return mask_tiff(masks, out_channels), "image/tiff", "mask.tif"
        return mask_png(masks[0], out_channels), "image/png", "mask.png"
    if output == "probabilities":
        probabilities = [page.probabilities for page in pages]
        if stack:
            body = probabilities_npy_pages(probabilities)
        else:
            body = probabilities_npy(probabilities[0])
        return body, "application/octet-stream", "probabilities.npy"
    if output == "instances":
        assert labels is not None
        if stack:
            return instances_tiff(labels), "image/tiff", "instances.tif"
        return instances_image(labels[0])
    if output != "overlay":
        raise ValueError(f"no output {output!r}")
    if stack:
        return overlay_tiff(images, masks, labels), "image/tiff", "overlay.tif"
    body = overlay_png(images[0], masks[0], None if labels is None else labels[0])
    return body, "image/png", "overlay.png"
