"""The request limits checked before any work is queued: pages and pixels of an image or
stack, and the memory cell instances would need."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unet_service.api.errors import ApiError
from unet_service.settings import Settings


def check_pages(settings: Settings, pages: Sequence[np.ndarray]) -> None:
    """413 for more pages, or more pixels in all pages together, than the limits."""
    if len(pages) > settings.max_pages:
        raise ApiError(
            413,
            f"the stack has {len(pages)} pages, more than the limit of "
            f"{settings.max_pages} (UNET_MAX_PAGES)",
        )
    height, width = pages[0].shape[:2]
    total = height * width * len(pages)
    if total > settings.max_pixels:
        what = "image is" if len(pages) == 1 else f"stack of {len(pages)} pages of"
        raise ApiError(
            413,
            f"{what} {width}x{height} = {total} pixels, more than the limit of "
            f"{settings.max_pixels}",
        )


def check_instances(
    settings: Settings, out_channels: int, image: np.ndarray | Sequence[np.ndarray] | None
) -> None:
    """Refuse instances that the model cannot give, or that would take more memory than
    UNET_MAX_INSTANCE_PIXELS allows, before anything is computed. A stack's pages are
    labelled one at a time, so the limit is per page."""
    if out_channels != 1:
        raise ApiError(422, "instances need a one-class model (foreground probabilities)")
    if image is None:
        return
    if not isinstance(image, np.ndarray):
        image = image[0]
    pixels = image.shape[0] * image.shape[1]
    limit = settings.max_instance_pixels
    if pixels > limit:
        raise ApiError(
            413,
            f"cell instances of a {image.shape[1]}x{image.shape[0]} image ({pixels} pixels) "
            f"need more memory than UNET_MAX_INSTANCE_PIXELS ({limit}) allows (instances "
            "peak at about 6 bytes per pixel, up to 60 on unusual maps); ask for the mask or "
            "probabilities, or segment the image in parts",
        )
