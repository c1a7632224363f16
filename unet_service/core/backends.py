"""Runtimes that execute the UNet on a batch of tiles, chosen by measurement:

- `torch`: eager PyTorch with BatchNorm folded into the convolutions and channels-last
  memory; the only one for CUDA and for reduced precision (autocast).
- `onnxruntime`: the same network exported to ONNX and run by ONNX Runtime's CPU provider.
  On a 2-core AVX-512 CPU it reached 0.88 of the fp32 matrix-multiply FLOP/s, against 0.70
  for folded channels-last eager PyTorch and 0.41 for plain NCHW (bench/ measures it again).

Both take normalised float32 (N, C, S, S) tiles and return float32 logits (N, K, S', S').
A bioimage.io package runs its own weights: ONNX in the same runtime, or TorchScript.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from unet_service.core.precision import Precision, autocast
from unet_service.options import BACKENDS


class Backend(Protocol):
    name: str

    def batch_shapes(self, max_batch: int) -> list[int]: ...

    def __call__(self, batch: np.ndarray) -> torch.Tensor: ...


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each Conv2d -> BatchNorm2d pair merged into one
    convolution (inference only: it bakes in the running statistics)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return model


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str, device: torch.device, precision: Precision) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    cpu_fp32 = device.type == "cpu" and precision == "fp32"
    if requested == "auto":
        return "onnxruntime" if cpu_fp32 and onnxruntime_available() else "torch"
    if requested == "onnxruntime":
        if not cpu_fp32:
            raise ValueError("the onnxruntime backend runs fp32 on the CPU only; use torch")
        if not onnxruntime_available():
            raise ValueError("the onnxruntime backend needs the onnxruntime package")
    return requested


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        precision: Precision,
        compile: bool = False,
    ) -> None:
        self.device = device
        self.precision = precision
        self.model = fold_batchnorm(model).to(device, memory_format=torch.channels_last)
        self.dtype = next(self.model.parameters()).dtype
        # Compiled graphs (and CUDA graphs, which "reduce-overhead" records) need static
        # shapes. Tile sizes already come in a few buckets; batches are padded up to a power
        # of two, so each bucket needs at most log2(max batch) + 1 graphs.
        self.compiled = compile
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.model = torch.compile(self.model, dynamic=False, mode=mode)

    def batch_shapes(self, max_batch: int) -> list[int]:
        """Batch sizes whose graphs serve batches of 1..max_batch tiles: every padded power
        of two when compiled, so none compiles during live traffic; one otherwise."""
        if not self.compiled:
            return [1]
        return [1 << k for k in range((max_batch - 1).bit_length() + 1)]

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        # Match the weights' dtype (float64 models are used to check exactness).
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.compiled and n & (n - 1):
            padding = x.new_zeros((1 << n.bit_length()) - n, *x.shape[1:])
            x = torch.cat([x, padding]).contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            # clone(): CUDA-graph outputs are overwritten by the next replay.
            return self.model(x)[:n].float().clone()


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    file: str | io.BytesIO,
    names: tuple[str, str],
    axes: tuple[str, str, str] = ("batch", "height", "width"),
    opset: int | None = None,
) -> None:
    """The network as ONNX, its (input, output) named `names`, with dynamic batch, height and
    width (`axes` names them): `example` is any legal input. The TorchScript-based exporter,
    which needs no onnxscript and traces the centre crops' sizes as shape arithmetic."""
    dims = dict(zip((0, 2, 3), axes, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            copy.deepcopy(model).float().cpu().eval(),
            (example,),
            file,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: dims, names[1]: dims},
            opset_version=opset,
            dynamo=False,
        )


class OnnxRuntimeBackend:
    """An ONNX model (its bytes) in an ONNX Runtime CPU session: our U-Net exported
    (`exported`), or a bioimage.io package's onnx weights as they are."""

    name = "onnxruntime"

    def __init__(self, onnx_model: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: in the service they share the cores
        # with decoding and encoding, and spinning threads slowed passes down there (a pass
        # of 4 tiles took 1.04 s without spinning against 1.19 s with it, on 2 busy cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    @classmethod
    def exported(cls, model: nn.Module, in_channels: int) -> OnnxRuntimeBackend:
        buf = io.BytesIO()
        export_onnx(model, torch.zeros(1, in_channels, 188, 188), buf, ("tiles", "logits"))
        return cls(buf.getvalue())

    def batch_shapes(self, max_batch: int) -> list[int]:
        return [1]  # any batch size runs the same session

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        (out, *_) = self.session.run(None, {self._input: np.ascontiguousarray(batch)})
        return torch.from_numpy(out)


class TorchScriptBackend:
    """A TorchScript module (a bioimage.io package's torchscript weights), run as it is."""

    name = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device) -> None:
        self.device = device
        self.module = module.to(device).eval()

    def batch_shapes(self, max_batch: int) -> list[int]:
        return [1]

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        out = self.module(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return out[0] if isinstance(out, list | tuple) else out


def make_backend(
    name: str,
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    in_channels: int,
    compile: bool = False,
) -> Backend:
    if compile and name == "auto":
        name = "torch"  # compiling is a PyTorch feature: asking for it picks that runtime
    if choose_backend(name, device, precision) == "onnxruntime":
        if compile:
            raise ValueError("compile applies to the torch backend, not onnxruntime")
        return OnnxRuntimeBackend.exported(model, in_channels)
    return TorchBackend(model, device, precision, compile=compile)
