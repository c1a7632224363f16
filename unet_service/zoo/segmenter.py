"""A bioimage.io package as a served model: the same interface as our `Segmenter`
(`core.engine.TiledModel`), so that its tiles go through the one recipe, the one tile queue
and the batcher's lane of the model like ours. Its tiles are cut as its geometry says (legal
input sizes, the halo as margin, the package's padding at the border), preprocessed by its own
steps (with statistics of the whole image where it needs them), run by its TorchScript or ONNX
weights, cropped by the halo and postprocessed by its own steps. Its masks threshold one class
at 0.5 and take the arg-max of several."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_service.core.backends import (
    OnnxRuntimeBackend,
    TorchScriptBackend,
    onnxruntime_available,
)
from unet_service.core.engine import TiledModel, resolve_device
from unet_service.options import BACKENDS
from unet_service.zoo.package import Package, PackageError, read_package
from unet_service.zoo.processing import PackageProcessing

# Beyond this many pixels an image's statistics are not measured (UNET_MAX_PIXELS' default).
MAX_MEASURED_PIXELS = 100_000_000


class PackageSegmenter(TiledModel):
    """A package on one device. `backend`: auto (ONNX Runtime on a CPU when the package has
    onnx weights, else TorchScript), torch (its torchscript weights) or onnxruntime (its
    onnx weights, on the CPU). Packages run in float32, as they are described."""

    precision = "fp32"

    def __init__(
        self,
        package: Package,
        device: str | torch.device = "auto",
        backend: str = "auto",
        max_measured_pixels: int = MAX_MEASURED_PIXELS,
    ) -> None:
        self.package = package
        self.geometry = package.geometry
        self.in_channels = package.in_channels
        self.out_channels = package.out_channels
        self.threshold = package.threshold
        if package.card is not None:
            self.instance_params = package.card.instances
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.backend = self._runtime(backend)
        if self.backend.name == "onnxruntime":
            self.device = torch.device("cpu")
        self._processing = PackageProcessing(package, max_measured_pixels)
        if self._processing.needs_statistics:
            self.measure = self._processing.measure
        self._to_declared = [package.dims.index(a) for a in package.input_axes]
        self._from_declared = [package.output_axes.index(a) for a in package.output_dims]

    @classmethod
    def from_package(
        cls,
        path: str | Path,
        device: str = "auto",
        backend: str = "auto",
        max_measured_pixels: int = MAX_MEASURED_PIXELS,
    ) -> PackageSegmenter:
        return cls(read_package(Path(path)), device, backend, max_measured_pixels)

    def _runtime(self, requested: str) -> TorchScriptBackend | OnnxRuntimeBackend:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        weights, name = self.package.weights, self.package.path.name
        if requested == "auto":
            onnx_first = self.device.type == "cpu" and onnxruntime_available()
            fmt = "onnx" if onnx_first and "onnx" in weights else weights[0]
            if fmt == "onnx" and not onnxruntime_available():
                raise PackageError(f"bioimage.io package {name}: its onnx weights need onnxruntime")
        else:
            fmt = "torchscript" if requested == "torch" else "onnx"
            if fmt not in weights:
                raise PackageError(
                    f"bioimage.io package {name}: it has no {fmt} weights (UNET_BACKEND="
                    f"{requested})"
                )
        entry = getattr(self.package.descr.weights, fmt)
        if fmt == "onnx" and getattr(entry, "external_data", None) is not None:
            raise PackageError(f"bioimage.io package {name}: its onnx weights keep external data")
        # bioimageio.spec's readers hold the file's bytes (checked against its hash), with
        # nothing to close.
        weights_bytes = entry.get_reader().read()
        if fmt == "onnx":
            return OnnxRuntimeBackend(weights_bytes)
        module = torch.jit.load(io.BytesIO(weights_bytes), map_location=self.device)
        return TorchScriptBackend(module, self.device)

    def normalize(self, raw: np.ndarray, statistics: Any = None) -> np.ndarray:
        """A tile's (C, S, S) pixels -> its input, preprocessed by the package's steps with
        the image's statistics (`measure`)."""
        return self._processing.preprocess(raw, statistics)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) preprocessed tiles -> (N, K, S - 2 (trim + halo), ...) float32
        outputs, postprocessed."""
        # The network takes the type the preprocessing ends in (the warm-up's zeros come
        # as float32 whatever that is); the input's declared type is the raw pixels'.
        x = batch.transpose(self._to_declared).astype(self.package.network_dtype, order="C")
        if self.package.batch_size == 1:  # a network that takes one tile at a time
            y = np.concatenate([self._run(x[i : i + 1]) for i in range(len(x))])
        else:
            y = self._run(x)
        y = y.transpose(self._from_declared)
        side, h = batch.shape[-1], self.geometry.halo
        out = side - 2 * self.geometry.trim  # what a valid-convolution network leaves
        if y.shape[-2:] != (out, out):
            raise RuntimeError(
                f"the network gave {tuple(y.shape[-2:])} for inputs of {side}x{side}, "
                f"where its package declares {out}x{out}"
            )
        return self._processing.postprocess(y[:, :, h : out - h, h : out - h])

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.backend(x).detach().cpu().numpy()
