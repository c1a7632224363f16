"""`unet-predict IMAGE... --output-dir DIR`: offline segmentation on the service's engine.
A multi-page TIFF is a stack: every page is segmented as if alone and the outputs are (D, H, W)
TIFF volumes (DIR/<name>.tif, .instances.tif; imaging.tiff_volume) and an .npy with a leading
page axis."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from unet_service.cli.stream import predict_section, wants_stream
from unet_service.core.engine import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, Segmenter
from unet_service.core.precision import PRECISIONS
from unet_service.core.weights import WeightsError
from unet_service.imaging.encode import mask_pixels
from unet_service.imaging.errors import ImageError
from unet_service.imaging.pages import read_pages
from unet_service.imaging.tiff_volume import labels_bytes, volume_bytes
from unet_service.imaging.tiff_writer import WriterError
from unet_service.pipeline.sinks import Segmentation


def mask_to_png(mask: np.ndarray, out_channels: int) -> Image.Image:
    return Image.fromarray(mask_pixels(mask, out_channels), mode="L")


def write_instances(labels: np.ndarray, stem: Path) -> Path:
    """16-bit PNG while the ids fit, else 32-bit TIFF (as the service encodes them)."""
    if labels.size == 0 or int(labels.max()) <= 0xFFFF:
        path = stem.with_name(stem.name + ".png")
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        path = stem.with_name(stem.name + ".tif")
        path.write_bytes(labels_bytes([labels]))
    return path


def write_stack(
    results: list[Segmentation], seg: Segmenter, args: argparse.Namespace, stem: Path
) -> None:
    """A stack's outputs, pages in order: STEM.tif (D, H, W) masks (pixels as the one-page
    PNG's), STEM.npy (D, H, W) or (D, K, H, W), STEM.instances.tif (D, H, W) (each page
    labelled on its own; 16-bit while the ids fit, as the service sends them)."""
    masks = [np.asarray(mask_to_png(r.mask, seg.out_channels)) for r in results]
    stem.with_name(stem.name + ".tif").write_bytes(volume_bytes(masks))
    probs = [r.probabilities for r in results if r.probabilities is not None]
    if args.probabilities and probs:
        np.save(
            stem.with_name(stem.name + ".npy"),
            np.stack([p[0] if len(p) == 1 else p for p in probs]),
        )
    if args.instances and probs:
        labels = labels_bytes([seg.instances(p) for p in probs])
        stem.with_name(stem.name + ".instances.tif").write_bytes(labels)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-predict",
        description="Segment images with a UNet by exact overlap-tile inference; writes "
        "DIR/<name>.png masks (and DIR/<name>.npy probabilities with --probabilities). A "
        "multi-page TIFF is a stack: DIR/<name>.tif (one mask page per page), .npy with a "
        "leading page axis, .instances.tif.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--output-dir", "-o", type=Path, required=True, metavar="DIR")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="%(default)s")
    p.add_argument(
        "--tile-size",
        type=int,
        default=DEFAULT_TILE_SIZE,
        help="output tile size; legal sizes are 4 + 2^depth * j (default %(default)s)",
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        seg = Segmenter.from_weights(args.weights, device=args.device, precision=args.precision)
        seg.geometry.check_tile(args.tile_size)
    except (WeightsError, ValueError) as e:
        parser.exit(2, f"unet-predict: error: {e}\n")
    if args.instances and seg.out_channels != 1:
        parser.exit(2, "unet-predict: error: --instances needs a one-class model\n")
    problem = output_clash(args.images, args.output_dir)
    if problem:
        parser.exit(2, f"unet-predict: error: {problem}\n")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    failures = 0
    with tqdm(args.images, unit="image", disable=len(args.images) < 2, file=sys.stderr) as bar:
        for path in bar:
            bar.set_postfix_str(path.name)
            try:
                if wants_stream(path, args.stream):
                    if args.tta != 1 or args.instances:
                        raise ImageError("--tta and --instances need the image in memory")
                    output = "probabilities" if args.probabilities else "mask"
                    predict_section(
                        seg,
                        path,
                        args.output_dir,
                        output=output,
                        tile_size=args.tile_size,
                        batch_size=args.batch_size,
                    )
                    continue
                # Local files are trusted: no page limit (memory is the user's to spend).
                pages = read_pages(str(path), max_pages=sys.maxsize)
                image = pages[0]
                plan_tiles = (
                    args.tta
                    * len(pages)
                    * len(seg.plan(image.shape[0], image.shape[1], args.tile_size))
                )
                with tqdm(
                    total=plan_tiles,
                    unit="tile",
                    leave=False,
                    disable=plan_tiles < 8,
                    file=sys.stderr,
                ) as tiles_bar:
                    results = [
                        seg.segment(
                            page,
                            tile_size=args.tile_size,
                            batch_size=args.batch_size,
                            probabilities=args.probabilities or args.instances,
                            tta=args.tta,
                            on_batch=tiles_bar.update,
                        )
                        for page in pages
                    ]
            except (OSError, ImageError, WriterError) as e:
                failures += 1
                tqdm.write(f"unet-predict: error: {path}: {e}", file=sys.stderr)
                continue
            if len(results) > 1:
                write_stack(results, seg, args, args.output_dir / path.stem)
                continue
            result = results[0]
            mask_to_png(result.mask, seg.out_channels).save(args.output_dir / f"{path.stem}.png")
            probs = result.probabilities
            if args.probabilities and probs is not None:
                np.save(
                    args.output_dir / f"{path.stem}.npy", probs[0] if len(probs) == 1 else probs
                )
            if args.instances and probs is not None:
                write_instances(seg.instances(probs), args.output_dir / f"{path.stem}.instances")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
