"""The service's limits on what it is asked, checked before any work is queued, in one place
for every way in: a request's pages and pixels, and for requests and jobs alike the memory
cell instances need and the pages a job must hold whole. (The image's own soundness is
`imaging`'s; sizes claimed by a file are checked against these limits by its reader.)"""

from __future__ import annotations

from unet_service.errors import InvalidRequestError, LimitError
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.settings import Settings


def check_stack(settings: Settings, pages: int, height: int, width: int) -> None:
    """A request's stack (or image, one page): at most UNET_MAX_PAGES pages and
    UNET_MAX_PIXELS pixels in all."""
    if pages > settings.max_pages:
        raise LimitError(
            f"the stack has {pages} pages, more than the limit of "
            f"{settings.max_pages} (UNET_MAX_PAGES)"
        )
    total = height * width * pages
    if total > settings.max_pixels:
        what = "image is" if pages == 1 else f"stack of {pages} pages of"
        raise LimitError(
            f"{what} {width}x{height} = {total} pixels, more than the limit of "
            f"{settings.max_pixels}"
        )


def check_instances(
    settings: Settings, out_channels: int, height: int | None = None, width: int | None = None
) -> None:
    """Refuse instances that the model cannot give, or that would take more memory than
    UNET_MAX_INSTANCE_PIXELS allows (per page: a stack's pages are labelled one at a
    time), before anything is computed. Without a size, only the model is checked."""
    if out_channels != 1:
        raise InvalidRequestError("instances need a one-class model (foreground probabilities)")
    if height is None or width is None:
        return
    pixels = height * width
    limit = settings.max_instance_pixels
    if pixels > limit:
        raise LimitError(
            f"cell instances of a {width}x{height} image ({pixels} pixels) "
            f"need more memory than UNET_MAX_INSTANCE_PIXELS ({limit}) allows (instances "
            "peak at about 6 bytes per pixel, up to 60 on unusual maps); ask for the mask or "
            "probabilities, or segment the image in parts"
        )


def check_measured(settings: Settings, height: int, width: int, measured: bool) -> None:
    """A model that normalises by statistics of the whole page (`measured`: a bioimage.io
    package's sample-wise preprocessing) measures them in memory: each page must fit
    UNET_MAX_PIXELS, whatever the job computes at once."""
    if measured and height * width > settings.max_pixels:
        raise LimitError(
            f"this model normalises each page by statistics of the whole page, measured in "
            f"memory, and a {width}x{height} page is more than UNET_MAX_PIXELS "
            f"({settings.max_pixels}) pixels"
        )


def check_job(
    settings: Settings,
    request: SegmentRequest,
    out_channels: int,
    height: int,
    width: int,
    measured: bool = False,
) -> None:
    """What a job must fit beyond its file's limits: outputs computed page by page whole
    hold each page in memory like a request, so each page must fit the same limits; so must
    every page of a model that normalises by statistics of the whole page (`measured`: a
    bioimage.io package's sample-wise preprocessing), which are measured in memory."""
    if request.labels:
        check_instances(settings, out_channels)
    pixels = height * width
    check_measured(settings, height, width, measured)
    if request.streamed:
        return
    if request.labels:
        limit, name = settings.max_instance_pixels, "UNET_MAX_INSTANCE_PIXELS"
    else:
        limit, name = settings.max_pixels, "UNET_MAX_PIXELS"
    if pixels > limit:
        tta = " with tta=8" if request.tta > 1 else ""
        raise LimitError(
            f"output={request.outputs[0]}{tta} computes each page whole, and a {width}x{height} "
            f"page is more than {name} ({limit}) pixels; mask and probabilities without tta "
            "are computed tile by tile at any size"
        )
