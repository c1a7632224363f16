"""The package's network files, all from one set of weights: the PyTorch state dict with the
architecture's source, and TorchScript and ONNX derived from it. Every format computes
probabilities (`UNetProbabilities`: the U-Net with its final activation), so a consumer that
runs the network as it is gets what the service returns, with no postprocessing to apply."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from unet_service.core import unet
from unet_service.core.backends import export_onnx
from unet_service.core.geometry import Geometry
from unet_service.core.unet import UNet, UNetProbabilities

# ONNX Runtime has run opset 17 since 1.15 (2023); ONNX export of this network needs nothing
# newer.
ONNX_OPSET = 17
# The package's names for its one input and one output tensor, and for their spatial axes.
INPUT, OUTPUT = "input", "output"
AXES = ("batch", "y", "x")
ARCHITECTURE_CALLABLE = UNetProbabilities.__name__


@dataclass(frozen=True)
class WeightFiles:
    architecture: Path  # unet.py: core/unet.py as it is, self-contained
    state_dict: Path
    torchscript: Path
    onnx: Path
    kwargs: dict[str, object]  # what ARCHITECTURE_CALLABLE is called with


def probabilities_model(model: UNet) -> UNetProbabilities:
    """The same network and weights, with the final activation, in eval mode on the CPU."""
    config = model.config
    wrapped = UNetProbabilities(list(config.channels), config.out_channels)
    wrapped.load_state_dict(model.state_dict())
    return wrapped.float().cpu().eval()


def write_weights(model: UNet, folder: Path) -> WeightFiles:
    """Write the four files into `folder`. TorchScript and ONNX are traced on the smallest
    legal input (the graph has no branch on values, and sizes stay symbolic), and keep
    height and width dynamic."""
    network = probabilities_model(model)
    geometry = Geometry(network.depth)
    side = geometry.input_for_output(geometry.min_tile)
    example = torch.zeros(1, network.config.in_channels, side, side)
    architecture = folder / "unet.py"
    shutil.copyfile(unet.__file__, architecture)
    state_dict = folder / "weights.pt"
    torch.save(network.state_dict(), state_dict)
    torchscript = folder / "weights_torchscript.pt"
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit.trace's deprecation notice. Tracing records the centre crops' sizes as
        # shape arithmetic, so the traced graph takes any legal size.
        warnings.simplefilter("ignore")
        # Its check (a second trace and run) is left to the tests, which run the traced
        # graph at other sizes against the network.
        torch.jit.trace(network, example, check_trace=False).save(str(torchscript))
    onnx = folder / "weights.onnx"
    export_onnx(network, example, str(onnx), (INPUT, OUTPUT), AXES, ONNX_OPSET)
    kwargs = {
        "channels": list(network.config.channels),
        "out_channels": network.config.out_channels,
    }
    return WeightFiles(architecture, state_dict, torchscript, onnx, kwargs)
