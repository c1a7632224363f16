"""`unet-import tutorial CHECKPOINT --channels 1,64,128,256,512,1024 --name NAME -o MODELS_DIR`:
a PyTorch state_dict of the tutorial's U-Net (core/tutorial.py) into MODELS_DIR/NAME.safetensors
and its card NAME.json, as the service and `unet-predict` load them. The checkpoint is read with
`torch.load(weights_only=True)`: a file that needs code unpickled is refused."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from unet_service.core.tutorial import CheckpointError, load_checkpoint, to_unet
from unet_service.core.weights import ModelCard, Normalization, save_weights

# A model's name is a file name in MODELS_DIR and a path segment of /v2/models/NAME.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _list_of(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r}") from None
        return values

    return parse


def _channels(text: str) -> list[int]:
    channels = _list_of(int, "channels must be whole numbers separated by commas")(text)
    if len(channels) < 3 or min(channels) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the input channels and at least two levels, all positive"
        )
    return channels


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty class name in {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-import",
        description="Import weights trained elsewhere as MODELS_DIR/NAME.safetensors and its "
        "model card NAME.json. 'tutorial': a state_dict of the PyTorch tutorial's "
        "UNet(channels, out_channels) built with its default padding=0 (bare, under "
        "'state_dict', 'model_state_dict' or 'model', DataParallel's 'module.' prefixes "
        "allowed); out_channels is read from the checkpoint.",
    )
    p.add_argument("format", choices=["tutorial"], help="where the weights come from")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a torch.save file")
    p.add_argument(
        "--channels",
        type=_channels,
        required=True,
        help="the channels the tutorial's UNet was built with, e.g. 1,64,128,256,512,1024",
    )
    p.add_argument("--name", required=True, help="the model's name (files NAME.*, /v2 paths)")
    p.add_argument(
        "--output-dir",
        "-o",
        type=Path,
        required=True,
        metavar="MODELS_DIR",
        help="the folder of models to write NAME.safetensors and NAME.json into",
    )
    p.add_argument(
        "--mean",
        type=_list_of(float, "mean must be numbers separated by commas"),
        default=[0.0],
        help="per-channel mean subtracted after scaling pixels to [0, 1] (default: 0)",
    )
    p.add_argument(
        "--std",
        type=_list_of(float, "std must be numbers separated by commas"),
        default=[1.0],
        help="per-channel std divided by after the mean (default: 1)",
    )
    p.add_argument(
        "--classes",
        type=_names,
        help="class names separated by commas, one per output channel "
        "(default: foreground for one, class0,class1,... for several)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="one class's mask threshold")
    p.add_argument("--force", action="store_true", help="replace a model NAME in MODELS_DIR")
    return p


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_card(args: argparse.Namespace, out_channels: int, digest: str) -> ModelCard:
    """The card of an imported model: what the user said and the checkpoint showed, where it
    came from, and no metrics (none were measured here)."""
    classes = args.classes or (
        ["foreground"] if out_channels == 1 else [f"class{i}" for i in range(out_channels)]
    )
    if len(classes) != out_channels:
        raise ValueError(
            f"--classes has {len(classes)} names; the checkpoint has {out_channels} output "
            "channel(s), one name each"
        )
    if any(s <= 0 for s in args.std):
        raise ValueError("--std values must be positive")
    n = args.channels[0]
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if len(values) not in (1, n):
            raise ValueError(
                f"{option} has {len(values)} values; give 1 (for every channel) or {n} "
                "(one per input channel)"
            )
    card = ModelCard(
        name=args.name,
        description=f"Imported by unet-import from {args.checkpoint.name}, a checkpoint of the "
        "PyTorch tutorial's UNet (sha256 in imported_from); not evaluated since.",
        channels=args.channels,
        out_channels=out_channels,
        class_names=classes,
        normalization=Normalization(mean=args.mean, std=args.std),
        threshold=args.threshold,
        imported_from={"format": "tutorial", "checkpoint": args.checkpoint.name, "sha256": digest},
    )
    card.check_consistent()
    return card


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> NoReturn:
        parser.exit(2, f"unet-import: error: {message}\n")

    if not MODEL_NAME.fullmatch(args.name):
        fail(f"--name {args.name!r}: use letters, digits, '_', '.' and '-' (up to 64)")
    if not 0 < args.threshold < 1:
        fail(f"--threshold must be between 0 and 1, got {args.threshold}")
    target = args.output_dir / f"{args.name}.safetensors"
    if not args.force and (target.exists() or target.with_suffix(".json").exists()):
        fail(f"{target} (or its card) already exists; --force replaces it")
    try:
        model = to_unet(load_checkpoint(args.checkpoint), args.channels)
    except CheckpointError as e:
        fail(f"{args.checkpoint}: {e}")
    try:
        card = build_card(args, model.config.out_channels, sha256_of(args.checkpoint))
    except ValidationError as e:
        first = e.errors()[0]
        fail(f"{'.'.join(map(str, first['loc'])) or 'card'}: {first['msg']}")
    except ValueError as e:
        fail(str(e))
    try:
        save_weights(model, card, target)
    except OSError as e:
        fail(f"cannot write {target}: {e.strerror or e}")
    print(
        f"wrote {target} and {target.with_suffix('.json').name}: channels "
        f"{','.join(map(str, card.channels))}, {card.out_channels} output channel(s), "
        f"classes {','.join(card.class_names)}"
    )
    return 0
