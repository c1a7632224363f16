"""`unet-export bioimageio`: the service's weights as a BioImage Model Zoo model package
(format 0.5), which `bioimageio test` passes in all three weight formats it holds.

The package describes the network as the service runs it: input sizes min + n * step, the
legal tile inputs of the U-Net's depth; an output smaller by the valid convolutions' shrink
(a size reference with a negative offset, so consumers compute it); the card's normalisation
as preprocessing; probabilities out (the activation is part of the network). Its test tensors
are a window of a real image and the service engine's probabilities for it."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from bioimageio.spec import ValidationContext, save_bioimageio_package
from bioimageio.spec.model import v0_5

from unet_service.core.engine import Segmenter
from unet_service.core.geometry import Geometry
from unet_service.core.normalize import unit_scale
from unet_service.core.weights import ModelCard, load_weights
from unet_service.interop.bioimageio_docs import documentation, plural, short_description
from unet_service.interop.bioimageio_sample import (
    PackageSample,
    SampleError,
    make_sample,
    recorded_sample,
)
from unet_service.interop.bioimageio_weights import (
    ARCHITECTURE_CALLABLE,
    INPUT,
    ONNX_OPSET,
    OUTPUT,
    WeightFiles,
    write_weights,
)

UNET_PAPER = v0_5.CiteEntry(
    text="Ronneberger, Fischer and Brox: U-Net: Convolutional Networks for Biomedical Image "
    "Segmentation. MICCAI 2015.",
    doi=v0_5.Doi("10.1007/978-3-319-24574-4_28"),
)
DEFAULT_TAGS = ("unet", "2d", "pytorch", "onnx", "torchscript", "semantic-segmentation")


def package_name(card: ModelCard) -> str:
    """`<card name> U-Net`, in the characters a Model Zoo name may hold."""
    allowed = "".join(
        c if c.isascii() and (c.isalnum() or c in "_+-() ") else "-" for c in card.name
    )
    return f"{allowed} U-Net"


def channel_names(count: int) -> list[str]:
    return ["grey"] if count == 1 else [f"channel{i}" for i in range(count)]


def preprocessing(card: ModelCard, dtype: np.dtype) -> list[v0_5.PreprocessingDescr]:
    """core.normalize's arithmetic as the Model Zoo's steps: to float32, times the type's
    scale to [0, 1], then (x - mean) / std as x * (1 / std) - mean / std (per channel where the
    card gives several values). It ends in float32 explicitly: otherwise the spec would cast
    the result back to the input's integer type."""
    norm = card.normalization
    mean = np.broadcast_to(np.asarray(norm.mean, np.float64), (card.in_channels,))
    std = np.broadcast_to(np.asarray(norm.std, np.float64), (card.in_channels,))
    gain, offset = (1 / std).tolist(), (-mean / std).tolist()
    if len(norm.mean) == len(norm.std) == 1:
        standardise = v0_5.ScaleLinearKwargs(gain=gain[0], offset=offset[0])
    else:
        standardise = v0_5.ScaleLinearAlongAxisKwargs(
            axis=v0_5.AxisId("channel"), gain=gain, offset=offset
        )
    to_float = v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))
    steps: list[v0_5.PreprocessingDescr] = [to_float]
    if unit_scale(dtype) != 1.0:
        steps.append(v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=unit_scale(dtype))))
    return [*steps, v0_5.ScaleLinearDescr(kwargs=standardise), to_float]


def tensors(
    card: ModelCard, sample: PackageSample, folder: Path
) -> tuple[v0_5.InputTensorDescr, v0_5.OutputTensorDescr]:
    geometry = Geometry(card.depth)
    dtype = sample.input.dtype
    np.save(folder / "test_input.npy", sample.input)
    np.save(folder / "test_output.npy", sample.output)
    size = v0_5.ParameterizedSize(
        min=geometry.input_for_output(geometry.min_tile), step=geometry.step
    )
    space_in = [v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=size) for a in ("y", "x")]
    space_out = [
        v0_5.SpaceOutputAxis(
            id=v0_5.AxisId(a),
            size=v0_5.SizeReference(
                tensor_id=v0_5.TensorId(INPUT), axis_id=v0_5.AxisId(a), offset=-geometry.shrink
            ),
        )
        for a in ("y", "x")
    ]
    model_input = v0_5.InputTensorDescr(
        id=v0_5.TensorId(INPUT),
        description=f"{plural(card.in_channels, 'channel')} of {dtype} pixels",
        axes=[
            v0_5.BatchAxis(),
            v0_5.ChannelAxis(channel_names=channel_names(card.in_channels)),
            *space_in,
        ],
        # Decoded images are uint8, uint16 or float32 (imaging.decode); floats are meant to
        # lie in [0, 1].
        data=v0_5.IntervalOrRatioDataDescr(
            type=str(dtype),
            range=(0.0, float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0),
        ),
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        pad=v0_5.ReflectPadding(mode="reflect"),
        preprocessing=preprocessing(card, dtype),
    )
    model_output = v0_5.OutputTensorDescr(
        id=v0_5.TensorId(OUTPUT),
        description="class probabilities",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=list(card.class_names)), *space_out],
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"),
    )
    return model_input, model_output


def weights_descr(files: WeightFiles) -> v0_5.WeightsDescr:
    version = v0_5.Version(torch.__version__.split("+")[0])
    parent = "pytorch_state_dict"
    return v0_5.WeightsDescr(
        pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
            source=files.state_dict,
            architecture=v0_5.ArchitectureFromFileDescr(
                source=files.architecture, callable=ARCHITECTURE_CALLABLE, kwargs=files.kwargs
            ),
            pytorch_version=version,
        ),
        torchscript=v0_5.TorchscriptWeightsDescr(
            source=files.torchscript, pytorch_version=version, parent=parent
        ),
        onnx=v0_5.OnnxWeightsDescr(source=files.onnx, opset_version=ONNX_OPSET, parent=parent),
    )


def export_bioimageio(
    weights: Path,
    output: Path,
    sample: Path | None = None,
    authors: Sequence[str] = ("unet-service",),
    tags: Sequence[str] = (),
    license: str = "MIT",
    name: str | None = None,
) -> Path:
    """Write the package for `weights` (and its card) to `output` and return its path.
    `sample` is the image its test tensors and cover are cut from; by default the first
    validation slice the card records, where it can be found. Raises WeightsError,
    SampleError, OSError, or the spec's ValidationError for a name, tag or license it
    refuses."""
    model, card = load_weights(weights)
    sample = sample or recorded_sample(card)
    if sample is None:
        raise SampleError(
            "no sample image: pass --sample IMAGE, an image like the model's inputs (its "
            "centre becomes the package's test input and cover)"
        )
    segmenter = Segmenter(model, card, device="cpu", backend="torch")
    package_sample = make_sample(segmenter, Path(sample))
    with tempfile.TemporaryDirectory(prefix="unet-export-") as tmp:
        folder = Path(tmp)
        files = write_weights(model, folder)
        model_input, model_output = tensors(card, package_sample, folder)
        (folder / "cover.png").write_bytes(package_sample.cover)
        scale = unit_scale(package_sample.input.dtype)
        page = documentation(card, str(package_sample.input.dtype), scale, Path(sample).name)
        (folder / "README.md").write_text(page)
        with ValidationContext(root=folder, perform_io_checks=True, raise_errors=True):
            descr = v0_5.ModelDescr(
                name=name or package_name(card),
                description=short_description(card),
                authors=[v0_5.Author(name=a) for a in authors],
                cite=[UNET_PAPER],
                license=license,
                tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
                documentation=v0_5.FileDescr(source=folder / "README.md"),
                covers=[v0_5.FileDescr(source=folder / "cover.png")],
                inputs=[model_input],
                outputs=[model_output],
                weights=weights_descr(files),
                # The card itself, so that a repository serving the package masks at its
                # threshold, cuts instances by its parameters and shows its figures.
                config=v0_5.Config(unet_service={"card": card.model_dump(mode="json")}),
            )
            with warnings.catch_warnings():
                # Its check of the written zip reads the files' entries before it knows the
                # zip as their root, and warns that it cannot yet; the check itself passes.
                warnings.filterwarnings("ignore", "Found mapping with 'source'", UserWarning)
                return save_bioimageio_package(descr, output_path=Path(output))
