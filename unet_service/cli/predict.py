"""`unet-predict IMAGE... --output-dir DIR`: offline segmentation on the service's engine.
A multi-page TIFF is a stack: every page is segmented as if alone and the outputs are (D, H, W)
TIFF volumes (DIR/<name>.tif, .instances.tif; imaging.tiff_volume) and an .npy with a leading
page axis."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unet_service.cli.stream import predict_section, wants_stream
from unet_service.cli.volume import is_zarr, predict_volume
from unet_service.core.engine import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, TiledModel
from unet_service.core.precision import PRECISIONS
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.core.weights import WeightsError
from unet_service.errors import InferenceError
from unet_service.imaging.encode import encode_output
from unet_service.imaging.errors import ImageError
from unet_service.imaging.pages import read_pages
from unet_service.imaging.tiff_writer import WriterError
from unet_service.locations import DEFAULT_ZARR_BLOCK
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.pipeline.sinks import Segmentation
from unet_service.serving.catalog import find_model, open_model


def write_outputs(
    pages: list[np.ndarray],
    results: list[Segmentation],
    labels: list[np.ndarray] | None,
    request: SegmentRequest,
    out_channels: int,
    stem: Path,
) -> None:
    """Each output as the service answers it (imaging.encode.encode_output), named after
    the image: STEM.png (a stack's STEM.tif), STEM.npy, STEM.instances.png (.tif beyond
    65535 cells, and for a stack)."""
    for output in request.outputs:
        body, _, filename = encode_output(output, pages, results, labels, out_channels)
        infix = ".instances" if output == "instances" else ""
        stem.with_name(f"{stem.name}{infix}{Path(filename).suffix}").write_bytes(body)


def output_clash(images: list[Path], output_dir: Path) -> str | None:
    """Why the outputs DIR/<stem>.png (.npy, .instances.png) cannot be written safely: two
    inputs with one stem would overwrite each other's results, and an input inside DIR named
    <stem>.png would be replaced by its own mask."""
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            return (
                f"{seen[path.stem]} and {path} would both write {output_dir / path.stem}.png; "
                "segment them into different output folders"
            )
        seen[path.stem] = path
        for suffix in (".png", ".tif", ".npy", ".instances.png", ".instances.tif"):
            target = output_dir / f"{path.stem}{suffix}"
            if target.exists() and path.exists() and target.samefile(path):
                return f"the output {target} would overwrite the input {path}; choose another -o"
    return None


def repository_weights(name: str, folder: Path | None) -> Path:
    """The weights of model `name` in a repository folder (the service's UNET_MODELS, found
    as the service finds them)."""
    return find_model(folder or Path(os.environ.get("UNET_MODELS") or DEFAULT_WEIGHTS.parent), name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-predict",
        description="Segment images with a UNet by exact overlap-tile inference; writes "
        "DIR/<name>.png masks (and DIR/<name>.npy probabilities with --probabilities). A "
        "multi-page TIFF is a stack: DIR/<name>.tif (one mask page per page), .npy with a "
        "leading page axis, .instances.tif. An OME-Zarr image NAME.zarr gives OME-Zarr "
        "results, computed block by block: DIR/NAME.zarr, .probabilities.zarr, "
        ".instances.zarr.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--output-dir", "-o", type=Path, required=True, metavar="DIR")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="%(default)s")
    p.add_argument(
        "--model",
        metavar="NAME",
        help="a model of the repository --models names (NAME.safetensors + NAME.json, or a "
        "bioimage.io package NAME.zip or NAME/), instead of --weights",
    )
    p.add_argument(
        "--models",
        type=Path,
        metavar="DIR",
        help="the model repository for --model (default: UNET_MODELS, else the folder of the "
        "shipped weights)",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        default=DEFAULT_TILE_SIZE,
        help="output tile size; legal sizes are 4 + 2^depth * j (default %(default)s); a "
        "bioimage.io package takes its largest legal tile not above it",
    )
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--probabilities", action="store_true", help="also write float32 .npy")
    p.add_argument(
        "--tta",
        action="store_const",
        const=8,
        default=1,
        help="test-time augmentation: average the 8 rotations and mirrorings (8x the time)",
    )
    p.add_argument(
        "--instances",
        action="store_true",
        help="also write cell labels by seeded watershed (one-class models): "
        "DIR/<name>.instances.png, 16-bit (a 32-bit .tif beyond 65535 cells)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read by window and write DIR/<name>.tif, a tiled TIFF (with --probabilities: "
        "DIR/<name>.probabilities.tif instead), in flat memory; automatic for TIFFs over "
        "100 megapixels a page",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="an OME-Zarr volume's blocks on this Dask cluster (tcp://host:8786), whose "
        "workers load the same --weights path and read and write the same paths",
    )
    p.add_argument(
        "--block",
        type=int,
        default=DEFAULT_ZARR_BLOCK,
        help="side of an OME-Zarr volume's blocks, pixels (whole chunks; default %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.block < 1:
        parser.error("--batch-size and --block must be >= 1")
    try:
        weights = repository_weights(args.model, args.models) if args.model else args.weights
        seg = open_model(weights, args.device, args.precision)
        args.tile_size = seg.geometry.tile_for(args.tile_size)
    except (WeightsError, ValueError) as e:
        parser.exit(2, f"unet-predict: error: {e}\n")
    if args.instances and seg.out_channels != 1:
        parser.exit(2, "unet-predict: error: --instances needs a one-class model\n")
    problem = output_clash(args.images, args.output_dir)
    if problem:
        parser.exit(2, f"unet-predict: error: {problem}\n")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out_dir = args.output_dir
    outputs = ("mask", "probabilities", "instances")
    wanted = (True, args.probabilities, args.instances)
    request = SegmentRequest(
        tuple(o for o, w in zip(outputs, wanted, strict=True) if w), None, args.tta
    )

    failures = 0
    with tqdm(args.images, unit="image", disable=len(args.images) < 2, file=sys.stderr) as bar:
        for path in bar:
            bar.set_postfix_str(path.name)
            try:
                if is_zarr(path):
                    if args.tta != 1:
                        raise ImageError("--tta is not available for OME-Zarr volumes")
                    predict_volume(
                        seg,
                        weights,
                        path,
                        out_dir,
                        outputs=request.outputs,
                        tile_size=args.tile_size,
                        batch_size=args.batch_size,
                        block=args.block,
                        scheduler=args.scheduler,
                        device=args.device,
                        precision=args.precision,
                    )
                    continue
                if wants_stream(path, args.stream):
                    if args.tta != 1 or args.instances:
                        raise ImageError("--tta and --instances need the image in memory")
                    output = "probabilities" if args.probabilities else "mask"
                    predict_section(
                        seg,
                        path,
                        out_dir,
                        output=output,
                        tile_size=args.tile_size,
                        batch_size=args.batch_size,
                    )
                    continue
                # Local files are trusted: no page limit (memory is the user's to spend).
                pages = read_pages(str(path), max_pages=sys.maxsize)
                results, labels = segment_pages(seg, pages, request, args)
            except (OSError, ImageError, WriterError, InferenceError) as e:
                failures += 1
                tqdm.write(f"unet-predict: error: {path}: {e}", file=sys.stderr)
                continue
            write_outputs(pages, results, labels, request, seg.out_channels, out_dir / path.stem)
    return 1 if failures else 0


def segment_pages(
    seg: TiledModel, pages: list[np.ndarray], request: SegmentRequest, args: argparse.Namespace
) -> tuple[list[Segmentation], list[np.ndarray] | None]:
    """Every page segmented as if alone (a progress bar for many tiles), and its cell ids
    when asked for."""
    recipe = seg.recipe(args.tile_size)
    height, width = pages[0].shape[:2]
    total = recipe.tiles(height, width, len(pages), request.tta)
    run = BatchRunner(seg, args.batch_size)
    results = []
    with tqdm(total=total, unit="tile", leave=False, disable=total < 8, file=sys.stderr) as bar:
        for page in pages:
            entry = recipe.for_images([page], probabilities=request.probabilities, tta=request.tta)
            run_tiles(entry, run, bar.update)
            results.append(entry.result())
    labels = [seg.instances(r.probabilities) for r in results] if request.labels else None
    return results, labels


if __name__ == "__main__":
    sys.exit(main())
