"""A bioimage.io model package (the BioImage Model Zoo's format) read, validated and checked
for what the service serves: a 2D network with one input and one output, both of axes batch,
channel, y and x (in any order), whose output has the input's size (or that size less a
border the network trims, a negative offset) less the halo it declares,
with TorchScript or ONNX weights and pre- and postprocessing that can be applied tile by tile
(sample statistics of the input are measured over the whole image first). Anything else is
refused with the reason, which the repository index shows.

The package is read with bioimageio.spec (the `bioimageio` extra), imported only here and only
when a package is read, so the service runs without it. Format 0.4 packages are read as
bioimageio.spec converts them to 0.5.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_service.core.geometry import PADDINGS, HaloGeometry
from unet_service.core.weights import ModelCard
from unet_service.zoo.checks import (
    PackageError,
    channel_names,
    check_2d,
    check_statistics,
    check_steps,
    input_sizes,
    output_halo,
    spatial,
)

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")
NEEDS_EXTRA = "it needs the bioimageio extra: pip install 'unet-service[bioimageio]'"
# A package's masks: one class above this probability, or the arg-max of several.
MASK_THRESHOLD = 0.5
SERVED_WEIGHTS = ("torchscript", "onnx")


def is_package(path: Path) -> bool:
    """A bioimage.io package: a .zip, or a folder holding rdf.yaml or bioimageio.yaml."""
    if path.is_dir():
        return any((path / name).is_file() for name in DESCRIPTION_FILES)
    return path.suffix == ".zip" and path.is_file()


@dataclass(frozen=True)
class Package:
    """What the service uses of a package. `descr` is bioimageio.spec's (0.5) description;
    axis names are its ids; `input_axes` and `output_axes` their order in the tensors."""

    path: Path
    descr: Any
    title: str
    description: str
    input_id: str
    input_axes: tuple[str, ...]
    input_dtype: str  # the raw pixels' type the package declares (images are brought to it)
    network_dtype: str  # what its preprocessing hands the network (its last ensure_dtype)
    output_id: str
    output_axes: tuple[str, ...]
    class_names: list[str]
    in_channels: int
    geometry: HaloGeometry
    halo_yx: tuple[int, int]  # the input halo of y and x, as bioimageio.core pads the image
    batch_size: int | None  # None: any
    weights: tuple[str, ...]  # of SERVED_WEIGHTS, those it has
    # Our model card, in packages `unet-export bioimageio` wrote (config.unet_service.card).
    card: ModelCard | None = None

    @property
    def threshold(self) -> float:
        return self.card.threshold if self.card else MASK_THRESHOLD

    @property
    def out_channels(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def dims(self) -> tuple[str, str, str, str]:
        """The input's axis ids in the order the service holds tiles: batch, channel, y, x."""
        return _by_type(self.input_axes, self.descr.inputs[0].axes)

    @functools.cached_property
    def output_dims(self) -> tuple[str, str, str, str]:
        return _by_type(self.output_axes, self.descr.outputs[0].axes)


def _by_type(ids: tuple[str, ...], axes: Any) -> tuple[str, str, str, str]:
    kinds = {str(a.id): (a.type if a.type != "space" else str(a.id)) for a in axes}
    order = ("batch", "channel", "y", "x")
    return tuple(next(i for i in ids if kinds[i] == kind) for kind in order)  # type: ignore[return-value]


def read_package(path: Path) -> Package:
    """The package at `path`, read and checked (cached while its file is unchanged), or
    PackageError with the reason it is not served ("bioimage.io package NAME.zip: it has 2
    inputs (...)")."""
    try:
        source = _description_source(path)
        read = _read(str(path), str(source), source.stat().st_mtime_ns)
    except PackageError as e:
        read = e
    if isinstance(read, PackageError):
        raise PackageError(f"bioimage.io package {path.name}: {read}") from None
    return read


def _description_source(path: Path) -> Path:
    if path.is_dir():
        for name in DESCRIPTION_FILES:
            if (path / name).is_file():
                return path / name
        raise PackageError(f"it holds no {' or '.join(DESCRIPTION_FILES)}")
    return path


@functools.lru_cache(maxsize=64)
def _read(path: str, source: str, stamp: int) -> Package | PackageError:
    """The package, or why it is refused: both kept, as reading validates (and hashes) every
    file of the package, and a refused package is asked about again and again."""
    try:
        return _read_checked(path, source)
    except PackageError as e:
        return e


def _read_checked(path: str, source: str) -> Package:
    try:
        from bioimageio.core import Tensor  # noqa: F401  (the pre- and postprocessing)
        from bioimageio.spec import InvalidDescr, load_description
        from bioimageio.spec.model import v0_5
    except ImportError:
        raise PackageError(NEEDS_EXTRA) from None
    try:
        descr = load_description(source, format_version="latest")
    except Exception as e:
        raise PackageError(f"it cannot be read: {_one_line(e)}") from None
    if isinstance(descr, InvalidDescr):
        raise PackageError(f"it is not a valid bioimage.io package: {_first_error(descr)}")
    if not isinstance(descr, v0_5.ModelDescr):
        raise PackageError(f"it describes a {descr.type}, not a model")
    return _check(Path(path), descr, v0_5)


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _first_error(descr: Any) -> str:
    for detail in descr.validation_summary.details:
        for error in detail.errors:
            where = ".".join(map(str, error.loc))
            return f"{where}: {error.msg}" if where else error.msg
    return "invalid"


def _check(path: Path, descr: Any, v0_5: Any) -> Package:
    if len(descr.inputs) != 1:
        raise PackageError(
            f"it has {len(descr.inputs)} inputs (only packages of one input are served)"
        )
    if len(descr.outputs) != 1:
        raise PackageError(
            f"it has {len(descr.outputs)} outputs (only packages of one output are served)"
        )
    (tensor,), (output,) = descr.inputs, descr.outputs
    check_2d(tensor, "input")
    check_2d(output, "output")
    if tensor.output_of is not None:
        raise PackageError(f"its input is the output of model {tensor.output_of}")
    if descr.run_mode is not None:
        raise PackageError(f"it asks for run mode {descr.run_mode.name!r}")
    weights = tuple(w for w in SERVED_WEIGHTS if getattr(descr.weights, w, None) is not None)
    if not weights:
        present = [name for name, value in descr.weights if value is not None]
        raise PackageError(
            f"it has no torchscript or onnx weights, which the service runs (it has "
            f"{', '.join(present)})"
        )
    check_steps(tensor.preprocessing, "preprocessing")
    check_steps(output.postprocessing, "postprocessing")
    check_statistics(descr)
    axes = {str(a.id): a for a in tensor.axes}
    min_input, step_input = input_sizes(axes, str(tensor.id), v0_5)
    (halo_y, trim_y), (halo_x, trim_x) = (
        output_halo(a, axes, str(tensor.id), v0_5) for a in spatial(output)
    )
    if trim_y != trim_x:
        raise PackageError(
            f"its output is smaller than its input by {2 * trim_y} in y and {2 * trim_x} in x "
            "(tiles are square)"
        )
    halo_yx = (halo_y, halo_x)
    pad = tensor.pad or v0_5.SymmetricPadding()
    if pad.mode not in PADDINGS:
        raise PackageError(
            f"it pads its input with mode {pad.mode!r} (the service pads {', '.join(PADDINGS)})"
        )
    try:
        geometry = HaloGeometry(max(halo_yx), min_input, step_input, pad.mode, trim_y)
    except ValueError as e:
        raise PackageError(str(e)) from None
    batch = next(a for a in tensor.axes if a.type == "batch")
    return Package(
        path=path,
        descr=descr,
        title=descr.name,
        description=descr.description,
        input_id=str(tensor.id),
        input_axes=tuple(str(a.id) for a in tensor.axes),
        input_dtype=tensor.dtype,
        network_dtype=_network_dtype(tensor.preprocessing),
        output_id=str(output.id),
        output_axes=tuple(str(a.id) for a in output.axes),
        class_names=channel_names(output, "output"),
        in_channels=len(channel_names(tensor, "input")),
        geometry=geometry,
        halo_yx=halo_yx,  # type: ignore[arg-type]
        batch_size=batch.size,
        weights=weights,
        card=_exported_card(descr),
    )


def _network_dtype(steps: Any) -> str:
    """The type the preprocessing ends in: bioimageio.spec closes every 0.5 preprocessing
    with an `ensure_dtype` step (float32 unless the package asks for another)."""
    last = steps[-1] if steps else None
    return str(last.kwargs.dtype) if last is not None and last.id == "ensure_dtype" else "float32"


def _exported_card(descr: Any) -> ModelCard | None:
    """The card a package of ours carries; None for others, or a card that does not read
    (the package is still served, as any other)."""
    ours = getattr(descr.config, "unet_service", None)
    if not isinstance(ours, dict) or not isinstance(ours.get("card"), dict):
        return None
    try:
        return ModelCard.model_validate(ours["card"])
    except ValueError:
        return None
