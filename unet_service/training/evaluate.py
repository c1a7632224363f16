"""`unet-eval`: measure a trained UNet on labelled image pairs with the real tiled inference
path. Per image and overall, for the mask at the card's threshold: the plain fraction of
mismatched pixels (`mismatch`), foreground Dice / IoU, and the adapted Rand error of the
connected cell interiors (`components_rand_error`, see training.scores). Overall, on the
ISBI 2012 challenge's own scale (see training.challenge): `challenge` (`pixel_error` and
`rand_error` as 1 - the best F-score over thresholds; the only `pixel_error` the card holds,
see core.card_metrics) and `instances` (the served cell instances: Rand error = 1 - V_Rand,
V_Rand, V_Info). Writes JSON. `--tune-instances` picks the instance parameters that minimise
their Rand error.

`--update-card` stores the numbers in the model card, which is how the shipped card's metrics
are produced (and what tests/test_train_shipped.py reproduces)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from unet_service.core.engine import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, Segmenter
from unet_service.core.precision import PRECISIONS
from unet_service.core.weights import WeightsError, load_weights, save_weights
from unet_service.pipeline.instances import InstanceParams
from unet_service.training.challenge import challenge_scores, segmentation_scores
from unet_service.training.data import DEFAULT_DATA, DataError, Pair, load_pairs, parse_slices
from unet_service.training.scores import Counts, confusion, rand_error
from unet_service.training.tune import tune_instances

ROUND = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-eval",
        description="Evaluate UNet weights on DATA/image + DATA/label pairs: at the card's "
        "threshold the mismatch, Dice, IoU and the Rand error of 4-connected cell interiors; "
        "on the ISBI 2012 challenge's scale the pixel and Rand errors (1 - the best F-score "
        "over thresholds) and the Rand error of the served cell instances (1 - V_Rand).",
    )
    p.add_argument("weights", nargs="?", type=Path, default=DEFAULT_WEIGHTS, help="%(default)s")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="%(default)s")
    p.add_argument(
        "--slices",
        default=None,
        help="pair indices (sorted by name), e.g. 20,21,22,23 or 20-23; default: the card's "
        "validation slices when the data holds them, else every pair",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--update-card", action="store_true", help="store the results in the card's metrics"
    )
    p.add_argument(
        "--tta",
        action="store_const",
        const=8,
        default=1,
        help="average the 8 rotations and mirrorings of each image (as the service's tta=8); "
        "with --update-card the results are stored beside the plain ones, under 'tta8'",
    )
    p.add_argument(
        "--tune-instances",
        action="store_true",
        help="choose the instance parameters (seed threshold, smoothing, minimum size) with "
        "the lowest Rand error on these slices; --update-card stores them in the card",
    )
    return p


def select(pairs: list[Pair], slices: str | None, card_slices: list[str]) -> list[Pair]:
    if slices is not None:
        return [pairs[i] for i in parse_slices(slices, len(pairs))]
    names = {p.name for p in pairs}
    if card_slices and set(card_slices) <= names:
        return [p for p in pairs if p.name in card_slices]
    return pairs


def evaluate(
    segmenter: Segmenter,
    pairs: list[Pair],
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 4,
    reference: Segmenter | None = None,
    tune: bool = False,
    tta: int = 1,
) -> dict[str, Any]:
    """Metrics per image and overall. Mismatch, Dice and IoU pool the pixels of all images;
    the overall components' Rand error is the mean of the per-image ones (slices are separate 2-D
    segmentations). With `reference` (an fp32 segmenter), also the fraction of mask pixels
    on which both agree."""
    per_image: dict[str, dict[str, float]] = {}
    total = Counts(0, 0, 0, 0)
    rands = []
    agree = 0
    pixels = 0
    maps = []
    for pair in pairs:
        result = segmenter.segment(pair.image, tile_size, batch_size, probabilities=True, tta=tta)
        mask = result.mask
        assert result.probabilities is not None
        maps.append(result.probabilities[0] if segmenter.out_channels == 1 else None)
        counts = confusion(mask, pair.label)
        rand = rand_error(mask, pair.label)
        total = total + counts
        rands.append(rand)
        row = {
            "mismatch": round(counts.mismatch, ROUND),
            "dice": round(counts.dice, ROUND),
            "iou": round(counts.iou, ROUND),
            "components_rand_error": round(rand.error, ROUND),
            "components_rand_precision": round(rand.precision, ROUND),
            "components_rand_recall": round(rand.recall, ROUND),
        }
        if reference is not None:
            ref = reference.segment(pair.image, tile_size, batch_size).mask
            same = int(np.count_nonzero(ref == mask))
            row["agreement_with_fp32"] = round(same / mask.size, ROUND)
            agree += same
            pixels += mask.size
        per_image[pair.name] = row
    overall: dict[str, float] = {
        "mismatch": round(total.mismatch, ROUND),
        "dice": round(total.dice, ROUND),
        "iou": round(total.iou, ROUND),
        "components_rand_error": round(float(np.mean([r.error for r in rands])), ROUND),
        "components_rand_precision": round(float(np.mean([r.precision for r in rands])), ROUND),
        "components_rand_recall": round(float(np.mean([r.recall for r in rands])), ROUND),
    }
    if reference is not None:
        overall["agreement_with_fp32"] = round(agree / pixels, ROUND)
    report: dict[str, Any] = {"overall": overall, "per_image": per_image}
    if segmenter.out_channels == 1:
        truths = [pair.label for pair in pairs]
        report["challenge"] = rounded(challenge_scores(maps, truths))
        if tune:
            best, trials = tune_instances(maps, truths, segmenter.card.threshold)
            segmenter.card.instances = best
            report["instance_tuning"] = [
                {"params": t["params"], **rounded({k: v for k, v in t.items() if k != "params"})}
                for t in trials
            ]
        instances = [segmenter.instances(m) for m in maps]
        report["instances"] = rounded(segmentation_scores(instances, truths))
        report["instances"]["params"] = (segmenter.card.instances or InstanceParams()).model_dump()
    return report


def rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, ROUND) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        model, card = load_weights(args.weights)
        segmenter = Segmenter(model, card, device=args.device, precision=args.precision)
        segmenter.geometry.check_tile(args.tile_size)
        pairs = select(
            load_pairs(args.data), args.slices, card.training.get("validation_slices", [])
        )
    except (WeightsError, DataError, ValueError) as e:
        parser.error(str(e))
    reference = None
    if segmenter.precision != "fp32":
        ref_model, _ = load_weights(args.weights)
        reference = Segmenter(ref_model, card, device=segmenter.device, precision="fp32")
    if args.tta > 1 and (reference is not None or args.tune_instances):
        parser.error("--tta evaluates fp32 with the card's instance parameters")
    results = evaluate(
        segmenter, pairs, args.tile_size, args.batch_size, reference, args.tune_instances, args.tta
    )
    argv_list = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join(["unet-eval", *argv_list]),
        "weights": args.weights.name,
        "slices": [p.name for p in pairs],
        "threshold": card.threshold,
        "precision": segmenter.precision,
        "tile_size": args.tile_size,
        "tta": args.tta,
        "rand_connectivity": 4,
        **results,
    }
    print(f"{'image':>8} {'mismatch':>9} {'dice':>7} {'iou':>7} {'cc_rand_err':>11}")
    rows = [*results["per_image"].items(), ("overall", results["overall"])]
    for name, r in rows:
        extra = f"  agree_fp32 {r['agreement_with_fp32']:.6f}" if reference is not None else ""
        print(
            f"{name:>8} {r['mismatch']:9.4f} {r['dice']:7.4f} {r['iou']:7.4f} "
            f"{r['components_rand_error']:11.4f}{extra}"
        )
    if "challenge" in results:
        c, i = results["challenge"], results["instances"]
        print(
            f"challenge scale: pixel error {c['pixel_error']:.4f} (threshold "
            f"{c['pixel_error_threshold']}), Rand error {c['rand_error']:.4f} (threshold "
            f"{c['rand_error_threshold']}); instances: Rand error (1 - V_Rand) "
            f"{i['rand_error']:.4f}, "
            f"V_Rand {i['v_rand']:.4f}, V_Info {i['v_info']:.4f}, {i['params']}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_card:
        # fp32 results are the card's metrics; other precisions are kept beside them, with
        # their agreement with fp32, so one card answers "what does bf16 do to my masks".
        others = dict(card.metrics.get("precisions", {}))
        if args.tta > 1:
            keep = ("command", "tta", "overall", "challenge", "instances")
            card.metrics = {**card.metrics, f"tta{args.tta}": {k: report[k] for k in keep}}
        elif segmenter.precision == "fp32":
            stored = dict(report)
            if "instance_tuning" in stored:  # the card keeps the five best candidates
                stored["instance_tuning"] = stored["instance_tuning"][:5]
            card.metrics = {**stored, "precisions": others} if others else stored
        else:
            others[segmenter.precision] = {
                "command": report["command"],
                "slices": report["slices"],
                "tile_size": report["tile_size"],
                "overall": results["overall"],
            }
            card.metrics = {**card.metrics, "precisions": others}
        save_weights(model, card, args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
