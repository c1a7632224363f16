"""`unet-export bioimageio WEIGHTS.safetensors -o NAME.zip`: the weights and their card as a
BioImage Model Zoo model package (unet_service/interop/bioimageio_export.py), for ilastik,
deepImageJ, bioimageio.core and the Zoo itself. Needs the `bioimageio` extra."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from unet_service.core.weights import WeightsError
from unet_service.imaging.errors import ImageError
from unet_service.options import DEFAULT_WEIGHTS

PROG = "unet-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export the service's weights to other ecosystems' formats."
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    bio = formats.add_parser(
        "bioimageio",
        help="a BioImage Model Zoo model package (.zip)",
        description="Write a BioImage Model Zoo model package (format 0.5): the weights as "
        "PyTorch state dict (with the U-Net's source), TorchScript and ONNX; the card's "
        "normalisation as preprocessing; probabilities out; test tensors, a cover and a "
        "documentation page from the card. Check it with `bioimageio test NAME.zip`.",
    )
    bio.add_argument("weights", type=Path, nargs="?", default=DEFAULT_WEIGHTS, metavar="WEIGHTS")
    bio.add_argument("--output", "-o", type=Path, required=True, metavar="NAME.zip")
    bio.add_argument(
        "--sample",
        type=Path,
        metavar="IMAGE",
        help="an image like the model's inputs; its centre becomes the test input and the "
        "cover (default: the first validation slice the card records, where it is found)",
    )
    bio.add_argument("--name", help="the package's name (default: '<card name> U-Net')")
    bio.add_argument(
        "--author",
        action="append",
        dest="authors",
        metavar="NAME",
        help="an author (repeat for several; default: unet-service)",
    )
    bio.add_argument(
        "--tag",
        action="append",
        dest="tags",
        default=[],
        metavar="TAG",
        help="a tag beside unet, 2d, pytorch, onnx, torchscript and semantic-segmentation, "
        "e.g. the modality (electron-microscopy) and content (cell-membrane); repeatable",
    )
    bio.add_argument("--license", default="MIT", help="an SPDX license id (default: MIT)")
    return parser


def one_line(error: Exception) -> str:
    """The first problem of a description the Model Zoo's spec refuses, else the message."""
    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return " ".join(str(error).split())


def export_bioimageio(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from unet_service.interop.bioimageio_export import export_bioimageio as export
    except ModuleNotFoundError as e:
        parser.exit(
            2,
            f"{PROG}: error: the bioimageio export needs {e.name}: "
            "pip install 'unet-service[bioimageio]'\n",
        )
    try:
        path = export(
            args.weights,
            args.output,
            sample=args.sample,
            authors=args.authors or ("unet-service",),
            tags=args.tags,
            license=args.license,
            name=args.name,
        )
    except (WeightsError, ImageError, OSError, ValueError) as e:
        parser.exit(2, f"{PROG}: error: {one_line(e)}\n")
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return export_bioimageio(args, parser)


if __name__ == "__main__":
    sys.exit(main())
