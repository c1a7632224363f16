"""A package's pre- and postprocessing, by bioimageio.core's own operators, applied tile by
tile as bioimageio.core applies them to a whole image.

bioimageio.core predicts a whole image by padding it by the halo (the package's padding mode),
measuring the statistics its preprocessing needs (a sample's mean and standard deviation,
percentiles) over that padded image, preprocessing, running the network, postprocessing, and
cropping the halo. Here the statistics are measured the same way, once per image (`measure`),
and every tile is preprocessed with them as fixed values, so a tile's input is the window of
the preprocessed padded image; postprocessing acts on each pixel and is applied to each
tile's output (packages whose postprocessing needs statistics are refused in
`zoo.package`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unet_service.core.normalize import to_unit
from unet_service.core.tiling import border_indices
from unet_service.imaging.decode import match_channels
from unet_service.imaging.errors import ImageTooLargeError
from unet_service.imaging.sources import Source
from unet_service.zoo.package import Package


class PackageProcessing:
    """The operators of `package`; `max_pixels` bounds the images whose statistics are
    measured (each is read whole for them, as bioimageio.core reads it; the service refuses
    larger job pages at once, `serving.limits.check_job`)."""

    def __init__(self, package: Package, max_pixels: int) -> None:
        from bioimageio.core.proc_ops import AddKnownDatasetStats, UpdateStats
        from bioimageio.core.proc_setup import setup_pre_and_postprocessing

        pre, post = setup_pre_and_postprocessing(package.descr, dataset_for_initial_statistics=[])
        self.package = package
        self.max_pixels = max_pixels
        self._measures = [op for op in pre if isinstance(op, UpdateStats)]
        self._pre = [op for op in pre if not isinstance(op, UpdateStats | AddKnownDatasetStats)]
        self._post = post

    @property
    def needs_statistics(self) -> bool:
        return bool(self._measures)

    def measure(self, source: Source, page: int) -> dict:
        """The statistics of page `page` of `source` that the preprocessing needs, measured
        over the page padded by the halo as bioimageio.core pads it."""
        from bioimageio.core import Sample

        height, width = source.height, source.width
        if height * width > self.max_pixels:
            raise ImageTooLargeError(
                f"the model {self.package.path.name} normalises each image by statistics of "
                f"the whole image, measured in memory up to {self.max_pixels} pixels; this one "
                f"has {height * width}"
            )
        pixels = self.as_declared(
            match_channels(source.read(page, 0, height, 0, width), self.package.in_channels)
        )
        (hy, hx), padding = self.package.halo_yx, self.package.geometry.padding
        padded = np.take(pixels, border_indices(-hy, height + hy, height, padding), axis=0)
        padded = np.take(padded, border_indices(-hx, width + hx, width, padding), axis=1)
        sample = Sample(members={self.package.input_id: self._tensor(padded)}, stat={}, id=None)
        for op in self._measures:
            op(sample)
        return sample.stat

    def preprocess(self, raw: np.ndarray, statistics: dict | None) -> np.ndarray:
        """(C, S, S) pixels of a tile in their own dtype -> the network's input, (C, S, S)."""
        from bioimageio.core import Sample

        member = self.package.input_id
        tile = self._tensor(self.as_declared(raw).transpose(1, 2, 0))
        sample = Sample(members={member: tile}, stat=dict(statistics or {}), id=None)
        for op in self._pre:
            op(sample)
        return _values(sample.members[member], self.package.dims)[0]

    def as_declared(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels of any type the service decodes (uint8, uint16, float in [0, 1]) in the
        type the package declares, by the same [0, 1] scale the service gives our models: a
        16-bit image to a package of 8-bit inputs is divided by 257, not wrapped around or
        taken as values 257 times too bright."""
        declared = np.dtype(self.package.input_dtype)
        if pixels.dtype == declared:
            return pixels
        unit = to_unit(pixels)
        if declared.kind in "ui":
            top = np.iinfo(declared).max
            return np.rint(np.clip(unit, 0.0, 1.0) * top).astype(declared)
        return unit.astype(declared)

    def postprocess(self, outputs: np.ndarray) -> np.ndarray:
        """(N, K, S', S') network outputs -> float32 (N, K, S', S') after postprocessing."""
        from bioimageio.core import Sample, Tensor

        member, dims = self.package.output_id, self.package.output_dims
        tensor = Tensor.from_numpy(outputs, dims=dims)
        sample = Sample(members={member: tensor}, stat={}, id=None)
        for op in self._post:
            op(sample)
        return _values(sample.members[member], dims).astype(np.float32, copy=False)

    def _tensor(self, pixels: np.ndarray) -> Any:
        """An (H, W, C) array as a tensor of one sample, dims batch, channel, y, x."""
        from bioimageio.core import Tensor

        return Tensor.from_numpy(pixels.transpose(2, 0, 1)[None], dims=self.package.dims)


def _values(tensor: Any, dims: tuple[str, ...]) -> np.ndarray:
    return np.asarray(tensor.transpose(dims).data)
