"""Draw the model card's figures: a validation slice, its label, the prediction of the
shipped weights, and where they differ, side by side; with --instances, the slice, the cell
instances the service returns, and the label's cells, each cell in a colour of its own.

    python -m training.figure [WEIGHTS] [--slice NAME] [--out weights/isbi2012_validation.png]
    python -m training.figure --instances [--out weights/isbi2012_instances.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unet_service.core.engine import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, Segmenter
from unet_service.core.weights import WeightsError
from unet_service.imaging.display import label_colours
from unet_service.training.challenge import segmentation_scores, truth_segments
from unet_service.training.data import DEFAULT_DATA, DataError, load_pairs
from unet_service.training.scores import confusion, rand_error

HEADER = 22


def panel(pixels: np.ndarray, title: str) -> Image.Image:
    """(H, W) uint8 grey or (H, W, 3) RGB array under a one-line title."""
    img = Image.fromarray(pixels).convert("RGB")
    out = Image.new("RGB", (img.width, img.height + HEADER), "white")
    out.paste(img, (0, HEADER))
    ImageDraw.Draw(out).text((6, 5), title, fill="black")
    return out


def side_by_side(panels: list[Image.Image], gap: int = 6) -> Image.Image:
    out = Image.new(
        "RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white"
    )
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def figure(image: np.ndarray, label: np.ndarray, mask: np.ndarray, name: str) -> Image.Image:
    grey = image[:, :, 0] if image.ndim == 3 else image
    truth, pred = label.astype(bool), mask.astype(bool)
    # Errors over the dimmed image: red = membrane predicted inside a cell, blue = membrane
    # missed (predicted cell interior on a true membrane).
    diff = np.repeat((grey // 64 * 32 + 64)[:, :, None], 3, axis=2).astype(np.uint8)
    diff[~pred & truth] = (230, 30, 30)
    diff[pred & ~truth] = (40, 90, 255)
    counts = confusion(pred, truth)
    rand = rand_error(pred, truth)
    panels = [
        panel(grey, f"slice {name}"),
        panel(np.where(truth, 255, 0).astype(np.uint8), "label (white = cell interior)"),
        panel(np.where(pred, 255, 0).astype(np.uint8), "prediction"),
        panel(
            diff,
            f"errors: mismatch {counts.mismatch:.4f}, Rand error of components {rand.error:.4f}",
        ),
    ]
    return side_by_side(panels)


def instances_figure(
    image: np.ndarray, label: np.ndarray, instances: np.ndarray, name: str, rand: float
) -> Image.Image:
    grey = image[:, :, 0] if image.ndim == 3 else image
    truth = truth_segments(label)

    def tinted(labels: np.ndarray) -> np.ndarray:
        base = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
        cells = labels > 0
        base[cells] = 0.45 * base[cells] + 0.55 * label_colours(labels)[cells]
        return np.rint(base).astype(np.uint8)

    panels = [
        panel(grey, f"slice {name}"),
        panel(tinted(instances), f"instances: {instances.max()} cells, Rand {rand:.4f}"),
        panel(tinted(truth), f"label: {truth.max()} cells"),
    ]
    return side_by_side(panels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.figure", description=__doc__.split("\n")[0]
    )
    p.add_argument("weights", nargs="?", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--slice", default=None, help="pair name; default the card's first validation")
    p.add_argument("--out", type=Path, default=None, help="default weights/isbi2012_*.png")
    p.add_argument("--instances", action="store_true", help="the cell-instances figure")
    args = p.parse_args(argv)
    kind = "instances" if args.instances else "validation"
    args.out = args.out or DEFAULT_WEIGHTS.parent / f"isbi2012_{kind}.png"
    try:
        seg = Segmenter.from_weights(args.weights, device="cpu")
        pairs = {pair.name: pair for pair in load_pairs(args.data)}
        name = args.slice or (seg.card.training.get("validation_slices") or [min(pairs)])[0]
        if name not in pairs:
            raise DataError(f"no pair named {name!r} in {args.data}")
    except (WeightsError, DataError, ValueError) as e:
        p.error(str(e))
    pair = pairs[name]
    result = seg.segment(pair.image, tile_size=DEFAULT_TILE_SIZE, probabilities=args.instances)
    if args.instances:
        assert result.probabilities is not None
        labels = seg.instances(result.probabilities)
        rand = segmentation_scores([labels], [pair.label])["rand_error"]
        fig = instances_figure(pair.image, pair.label, labels, name, rand)
    else:
        fig = figure(pair.image, pair.label, result.mask, name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette (the greys plus the two error colours) keeps the PNG small.
    fig.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
