"""Small bioimage.io model packages built on the spot (nothing is downloaded), for the tests
and `python -m bench.zoo_package`: a padded convolutional network (three 3x3 convolutions with
padding 1: a receptive field of radius 3, inside the declared halo) with random weights, saved
as TorchScript and ONNX, its input normalised to zero mean and unit variance per sample and its
output passed through a sigmoid, described with bioimageio.spec and saved with its test
tensors; and packages the service refuses (a z axis, two inputs)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HALO = 8
MIN_SIZE, STEP = 32, 8
EPS = 1e-6


def padded_conv_net(in_channels: int = 1, out_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, out_channels, 3, padding=1),
    ).eval()


def _test_tensors(folder: Path, net: nn.Module, in_channels: int) -> tuple[Path, Path]:
    """A test input and the output bioimageio.core's own test expects of it (the sample's
    statistics over the unpadded input, as its test computes them)."""
    raw = np.random.default_rng(0).integers(0, 255, (1, in_channels, 64, 64)).astype(np.float32)
    mean = raw.mean(axis=(2, 3), keepdims=True, dtype=np.float64)
    std = raw.std(axis=(2, 3), keepdims=True, dtype=np.float64)
    x = ((raw - mean) / (std + EPS)).astype(np.float32)
    with torch.no_grad():
        out = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", out)
    return folder / "test_input.npy", folder / "test_output.npy"


def _save_weights(folder: Path, net: nn.Module, in_channels: int) -> tuple[Path, Path]:
    torch.jit.script(net).save(str(folder / "weights.pt"))
    axes = {0: "batch", 2: "y", 3: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net,
            (torch.zeros(1, in_channels, 64, 64),),
            str(folder / "weights.onnx"),
            input_names=["raw"],
            output_names=["prob"],
            dynamic_axes={"raw": axes, "prob": axes},
            opset_version=17,
            dynamo=False,
        )
    return folder / "weights.pt", folder / "weights.onnx"


def build_package(
    path: Path,
    *,
    out_channels: int = 1,
    seed: int = 0,
    weights: tuple[str, ...] = ("torchscript", "onnx"),
    z_axis: bool = False,
    two_inputs: bool = False,
) -> Path:
    """The padded-conv package as `path` (a .zip). `z_axis` and `two_inputs` describe what
    the service refuses (their networks are never run)."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5

    net = padded_conv_net(1, out_channels, seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        test_in, test_out = _test_tensors(folder, net, 1)
        torchscript, onnx = _save_weights(folder, net, 1)
        (folder / "README.md").write_text("A padded convolutional network for tests.\n")
        raw, y, x = v0_5.TensorId("raw"), v0_5.AxisId("y"), v0_5.AxisId("x")
        size = v0_5.ParameterizedSize(min=MIN_SIZE, step=STEP)
        space = [v0_5.SpaceInputAxis(id=y, size=size), v0_5.SpaceInputAxis(id=x, size=size)]
        if z_axis:
            space.insert(0, v0_5.SpaceInputAxis(id=v0_5.AxisId("z"), size=4))
            volume = np.full((1, 1, 4, 64, 64), 0.5, np.float32)
            np.save(test_in, volume)
            np.save(test_out, volume)
        inputs = [
            v0_5.InputTensorDescr(
                id=raw,
                axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["em"]), *space],
                test_tensor=v0_5.FileDescr(source=test_in),
                preprocessing=[
                    v0_5.ZeroMeanUnitVarianceDescr(
                        kwargs=v0_5.ZeroMeanUnitVarianceKwargs(axes=[y, x], eps=EPS)
                    )
                ],
            )
        ]
        if two_inputs:
            inputs.append(
                v0_5.InputTensorDescr(
                    id=v0_5.TensorId("mask"),
                    axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=["mask"]), *space],
                    test_tensor=v0_5.FileDescr(source=test_in),
                )
            )
        out_space = [
            v0_5.SpaceOutputAxisWithHalo(
                id=a.id, size=v0_5.SizeReference(tensor_id=raw, axis_id=a.id), halo=HALO
            )
            if a.id != "z"
            else v0_5.SpaceOutputAxis(id=a.id, size=4)
            for a in space
        ]
        names = ["foreground"] if out_channels == 1 else [f"class{i}" for i in range(out_channels)]
        output = v0_5.OutputTensorDescr(
            id=v0_5.TensorId("prob"),
            axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=names), *out_space],
            test_tensor=v0_5.FileDescr(source=test_out),
            postprocessing=[v0_5.SigmoidDescr()],
        )
        entries = {
            "torchscript": v0_5.TorchscriptWeightsDescr(
                source=torchscript, pytorch_version=v0_5.Version(torch.__version__.split("+")[0])
            ),
            "onnx": v0_5.OnnxWeightsDescr(source=onnx, opset_version=17),
        }
        descr = v0_5.ModelDescr(
            name=f"padded conv {path.stem}",
            description="Three padded 3x3 convolutions with random weights (a test network).",
            authors=[v0_5.Author(name="unet-service tests")],
            cite=[v0_5.CiteEntry(text="none", url="https://bioimage.io")],
            license="MIT",
            documentation=v0_5.FileDescr(source=folder / "README.md"),
            inputs=inputs,
            outputs=[output],
            weights=v0_5.WeightsDescr(**{w: entries[w] for w in weights}),
        )
        return save_bioimageio_package(descr, output_path=path)
