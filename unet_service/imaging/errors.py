"""Why an image cannot be used: the errors every reader raises, whatever the transport. The
HTTP API maps them onto status codes in one place (unet_service.api.errors): too large 413,
not an image 415, anything else 422."""

from __future__ import annotations


class ImageError(ValueError):
    """Base class: the upload cannot be used as an image."""


class EmptyImageError(ImageError):
    """Empty file, or an image with zero height or width."""


class UnsupportedImageError(ImageError):
    """Not an image in a supported format, or truncated/corrupt."""


class CorruptImageError(UnsupportedImageError):
    """A supported format (recognised by its signature) whose data cannot be decoded."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed (decompression-bomb guard)."""


class StackMismatchError(ImageError):
    """The pages of a stack (a multi-page TIFF) differ in size, samples or pixel type."""


class TooManyPagesError(ImageTooLargeError):
    """More pages (IFDs) than allowed."""
