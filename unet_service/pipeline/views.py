"""Test-time augmentation's views: an image seen rotated by 0, 90, 180 and 270 degrees, each
also mirrored (the 8 elements of the dihedral group). A view of a source is a source
(`DihedralView`): each window of the view is read as the matching window of the image, then
turned, so a view is tiled like any image and nothing is copied beyond its tiles; `view` turns
an array (or a view of one) the same way, so results land in the image's own frame.

View k: rotated k % 4 times by 90 degrees counterclockwise (numpy's rot90), then mirrored
left-right when k >= 4.
"""

from __future__ import annotations

import numpy as np

from unet_service.imaging.sources import Source

VIEWS = 8


def view(array: np.ndarray, k: int, axes: tuple[int, int]) -> np.ndarray:
    """The k-th dihedral view of `array` over two axes, as a numpy view (no copy)."""
    rotated = np.rot90(array, k % 4, axes=axes)
    if k < 4:
        return rotated
    index = [slice(None)] * array.ndim
    index[axes[1]] = slice(None, None, -1)
    return rotated[tuple(index)]


class DihedralView:
    """View k of `source`, as a source of its own (height and width swap for odd turns)."""

    def __init__(self, source: Source, k: int) -> None:
        if not 0 <= k < VIEWS:
            raise ValueError(f"view {k} of {VIEWS}")
        self.source, self.k = source, k
        self.pages, self.channels, self.dtype = source.pages, source.channels, source.dtype
        turned = k % 2 == 1
        self.height = source.width if turned else source.height
        self.width = source.height if turned else source.width

    @property
    def pixels(self) -> int:
        return self.source.pixels

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.k >= 4:  # mirrored: the window of the turned image, read reversed
            x0, x1 = self.width - x1, self.width - x0
        height, width = self.source.height, self.source.width
        turns = self.k % 4
        # The window of the image that view window [y0:y1, x0:x1] shows, turned back.
        if turns == 0:
            window = (y0, y1, x0, x1)
        elif turns == 1:  # view[i, j] = image[j, W-1-i]
            window = (x0, x1, width - y1, width - y0)
        elif turns == 2:  # view[i, j] = image[H-1-i, W-1-j]
            window = (height - y1, height - y0, width - x1, width - x0)
        else:  # view[i, j] = image[H-1-j, i]
            window = (height - x1, height - x0, y0, y1)
        block = np.rot90(self.source.read(page, *window), turns, axes=(0, 1))
        return block[:, ::-1] if self.k >= 4 else block

    def close(self) -> None:
        """The image's source is closed by its owner."""
