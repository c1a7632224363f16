"""What the service checks of a bioimage.io package's tensors and steps before serving it:
2D axes, sizes it can tile by, an output the input's size or smaller by an even border, steps
applied pixel by pixel, statistics it can measure. Each check raises PackageError with the
reason, which the repository index shows (`zoo.package` reads the package and calls them)."""

from __future__ import annotations

from typing import Any

# Steps bioimage.io defines that act on each pixel (given statistics measured beforehand).
PER_PIXEL_STEPS = {
    "binarize",
    "clip",
    "ensure_dtype",
    "fixed_zero_mean_unit_variance",
    "scale_linear",
    "scale_mean_variance",
    "scale_range",
    "sigmoid",
    "softmax",
    "zero_mean_unit_variance",
}


class PackageError(ValueError):
    """Why a package is not served (one line)."""


def axis_ids(tensor: Any) -> str:
    return ",".join(str(a.id) for a in tensor.axes)


def check_2d(tensor: Any, role: str) -> None:
    types = sorted(a.type for a in tensor.axes)
    spaces = sorted(str(a.id) for a in tensor.axes if a.type == "space")
    if types != ["batch", "channel", "space", "space"] or spaces != ["x", "y"]:
        raise PackageError(
            f"its {role} has axes {axis_ids(tensor)} (only 2D images, of axes batch, channel, y "
            "and x, are served)"
        )


def spatial(tensor: Any) -> list[Any]:
    axes = {str(a.id): a for a in tensor.axes}
    return [axes["y"], axes["x"]]


def channel_names(tensor: Any, role: str) -> list[str]:
    channel = next(a for a in tensor.axes if a.type == "channel")
    names = getattr(channel, "channel_names", None)
    if not names:
        raise PackageError(f"its {role}'s channels are not a fixed list")
    return [str(n) for n in names]


def check_steps(steps: Any, kind: str) -> None:
    for step in steps:
        if step.id not in PER_PIXEL_STEPS:
            raise PackageError(f"its {kind} step {step.id!r} is not applied tile by tile")
        if step.id == "softmax" and str(step.kwargs.axis) != "channel":
            raise PackageError(f"its {kind} softmax runs along {step.kwargs.axis}, not channels")


def check_statistics(descr: Any) -> None:
    """Statistics of the input sample are measured over the whole image; dataset statistics
    would have to be stated in the package (as fixed values), and statistics of the output
    would need the whole output before any tile is done."""
    from bioimageio.core.proc_setup import get_requried_measures
    from bioimageio.core.stat_measures import DatasetMeasureBase

    needed = get_requried_measures(descr)
    if any(isinstance(m, DatasetMeasureBase) for m in needed.pre):
        raise PackageError("its preprocessing needs dataset statistics that it does not state")
    if needed.post:
        raise PackageError("its postprocessing needs statistics of a whole tensor")


def input_sizes(axes: dict[str, Any], tensor_id: str, v0_5: Any) -> tuple[int, int]:
    """(min, step) of the input's y and x, which must take the same sizes (tiles are
    square); step 0 for a fixed size."""

    def legal(axis: Any, seen: tuple[str, ...] = ()) -> tuple[int, int]:
        size = axis.size
        if isinstance(size, int):
            return size, 0
        if isinstance(size, v0_5.ParameterizedSize):
            return size.min, size.step
        if (
            isinstance(size, v0_5.SizeReference)
            and str(size.tensor_id) == tensor_id
            and str(size.axis_id) in ("y", "x")
            and str(size.axis_id) not in seen
            and size.offset == 0
            and axes[str(size.axis_id)].scale == axis.scale
        ):
            return legal(axes[str(size.axis_id)], (*seen, str(axis.id)))
        raise PackageError(f"its input's {axis.id} size ({size}) is not one the service tiles by")

    y, x = legal(axes["y"]), legal(axes["x"])
    if y != x:
        raise PackageError(
            f"its input's y and x take different sizes, (min, step) {y} and {x} (tiles are square)"
        )
    return y


def output_halo(axis: Any, inputs: dict[str, Any], tensor_id: str, v0_5: Any) -> tuple[int, int]:
    """(halo, trim) of an output axis: the input's size with an offset of -2 trim (0 for a
    network that keeps its input's size), `halo` of it cropped at each border."""
    size = axis.size
    follows = (
        isinstance(size, v0_5.SizeReference)
        and str(size.tensor_id) == tensor_id
        and str(size.axis_id) == str(axis.id)
        and inputs[str(axis.id)].scale == axis.scale
    )
    if not follows or size.offset > 0 or size.offset % 2:
        raise PackageError(
            f"its output's {axis.id} is not the input's {axis.id} less an even border ({size}; "
            "only outputs of the input's size, or smaller by a border on each side, are served)"
        )
    return int(getattr(axis, "halo", 0)), -size.offset // 2
