"""The sample a BioImage Model Zoo package is tested and shown with: a window of a real image
as the test input, the service engine's probabilities for it as the test output, and the cover
drawn from both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unet_service.core.engine import Segmenter
from unet_service.core.weights import ModelCard
from unet_service.imaging.decode import read_image
from unet_service.imaging.encode import overlay_rgb, png_bytes
from unet_service.imaging.errors import ImageError

# The test window's output side at most: big enough to show cells on the cover, small
# enough that `bioimageio test` runs it quickly in every weight format.
MAX_WINDOW_OUTPUT = 256


class SampleError(ValueError):
    """No usable sample image: none given and none found, or one too small for the model."""


@dataclass(frozen=True)
class PackageSample:
    input: np.ndarray  # (1, C, S, S) pixels in the image's own dtype: the test input
    output: np.ndarray  # (1, K, T, T) float32 probabilities, T = S - shrink: the test output
    cover: bytes  # PNG, 2:1: the window's output area, and the same with its mask overlaid


def recorded_sample(card: ModelCard) -> Path | None:
    """The first validation slice of the data the card says the model was trained on
    (`unet-train` records the folder as it was given, relative to where it ran), if that
    file is here; None otherwise."""
    data, slices = card.training.get("data"), card.training.get("validation_slices")
    if not isinstance(data, str) or not slices:
        return None
    folder = Path(data) / "image"
    found = sorted(folder.glob(f"{slices[0]}.*")) if folder.is_dir() else []
    return found[0] if found else None


def window_output(segmenter: Segmenter, height: int, width: int) -> int:
    """The largest legal tile output of at most MAX_WINDOW_OUTPUT whose input window fits in
    a height x width image."""
    geometry = segmenter.geometry
    room = min(height, width, MAX_WINDOW_OUTPUT + geometry.shrink) - geometry.shrink
    if room < geometry.min_tile:
        need = geometry.input_for_output(geometry.min_tile)
        raise SampleError(
            f"the sample image is {width}x{height}; this model needs at least {need}x{need}"
        )
    return geometry.nearest_legal_outputs(room)[0]


def make_sample(segmenter: Segmenter, path: Path) -> PackageSample:
    """The centre window of the image at `path` (its first page, its channels matched to the
    model's as the service matches them), with the engine's probabilities for it."""
    try:
        image = segmenter.prepare(read_image(str(path)))
    except (OSError, ImageError) as e:
        raise SampleError(f"sample image {path}: {e}") from None
    height, width = image.shape[:2]
    out = window_output(segmenter, height, width)
    side = segmenter.geometry.input_for_output(out)
    top, left = (height - side) // 2, (width - side) // 2
    window = np.ascontiguousarray(image[top : top + side, left : left + side].transpose(2, 0, 1))
    probabilities = segmenter.forward(segmenter.normalize(window)[None])
    margin = segmenter.geometry.margin
    shown = image[top + margin : top + margin + out, left + margin : left + margin + out]
    return PackageSample(
        window[None], probabilities, cover(shown, segmenter.to_mask(probabilities[0]))
    )


def cover(image: np.ndarray, mask: np.ndarray) -> bytes:
    """The (H, W, C) image beside its mask's overlay, as the service draws overlays: a 2:1
    PNG, the aspect the Model Zoo asks covers to have."""
    plain = overlay_rgb(image, np.zeros_like(mask))
    return png_bytes(Image.fromarray(np.concatenate([plain, overlay_rgb(image, mask)], axis=1)))
