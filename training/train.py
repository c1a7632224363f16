"""`unet-train`: train a UNet on a folder of image/label pairs with the U-Net paper's recipe
(overlap-tile crops with mirrored borders, elastic deformations, flips/rotations, intensity
jitter, optional border-weighted loss), validating with the real tiled inference path.

The best validation checkpoint is written atomically (`.safetensors` + card) whenever it
improves, so stopping the run at any time leaves a usable model."""

from __future__ import annotations

import argparse
import copy
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.engine import Segmenter, resolve_device
from model.geometry import Geometry
from model.precision import autocast, resolve_precision
from model.unet import UNet
from model.weights import ModelCard, WeightsError, load_weights, save_weights
from training.augment import CropSampler
from training.data import (
    DEFAULT_DATA,
    DEFAULT_VALIDATION,
    REPO_ROOT,
    DataError,
    Pair,
    load_pairs,
    parse_slices,
)
from training.losses import border_weight_map, weighted_bce

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-train",
        description="Train a UNet on DATA/image + DATA/label pairs (label > half range = "
        "foreground) and write the best validation checkpoint as .safetensors + card.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with image/, label/")
    p.add_argument("--out", type=Path, default=Path("runs/unet.safetensors"))
    p.add_argument("--channels", default="1,16,32,64,128,256", help="input channels, then levels")
    p.add_argument(
        "--val-slices",
        default=",".join(map(str, DEFAULT_VALIDATION)),
        help="held-out pair indices (sorted by name), e.g. 20,21,22,23 or 20-23",
    )
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps (upper bound)")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop after this long")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--output-size", type=int, default=196, help="output crop size (legal size)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam peak learning rate (cosine)")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=0.1,
        help="BatchNorm running-statistics momentum; smaller averages over more of the small "
        "batches, steadying the statistics used at inference",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="forward-pass autocast; auto = bf16 where the device runs it fast (AMX / AVX-512 "
        "BF16 CPUs, recent GPUs), else fp32. Weights, optimiser and loss stay fp32",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999) "
        "and validate and save it instead of the raw weights; 0 = off",
    )
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--border-weight", type=float, default=0.0, help="w0 of the paper; 0 = off")
    p.add_argument("--border-sigma", type=float, default=5.0)
    p.add_argument("--class-balance", action="store_true", help="class-frequency weights w_c")
    p.add_argument("--elastic-sigma", type=float, default=10.0, help="px; 0 = no deformation")
    p.add_argument("--elastic-grid", type=int, default=3)
    p.add_argument("--jitter", type=float, default=0.1, help="intensity jitter amount")
    p.add_argument("--val-every", type=int, default=200, help="validate every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0 = torch's default); 1 is fastest when other processes share the cores",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (fine-tuning): their channels and normalisation are kept",
    )
    p.add_argument("--name", default="unet")
    p.add_argument("--description", default="")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_channels(text: str) -> list[int]:
    try:
        ch = [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--channels {text!r} is not a comma-separated list of ints") from None
    if len(ch) < 3 or any(c < 1 for c in ch):
        raise ValueError("--channels needs the input channels and at least two positive levels")
    return ch


def to_unit(image: np.ndarray) -> np.ndarray:
    """(H, W, C) pixels -> (H, W) float32 in [0, 1], the scale the card's normalisation uses.
    Training reads the first channel only: the shipped models are grey-scale."""
    x = image[:, :, 0].astype(np.float32)
    if image.dtype == np.uint8:
        return x / 255
    if image.dtype == np.uint16:
        return x / 65535
    return x


def validate(segmenter: Segmenter, pairs: list[Pair]) -> tuple[float, float]:
    """Best pixel error over THRESHOLDS on the validation pairs, and that threshold, using
    one tile per slice (exact, see model.tiling)."""
    errors = np.zeros(len(THRESHOLDS))
    total = 0
    for pair in pairs:
        tile = segmenter.geometry.smallest_output_covering(max(pair.label.shape))
        probs = segmenter.segment(pair.image, tile_size=tile, probabilities=True).probabilities
        assert probs is not None
        truth = pair.label.astype(bool)
        for j, t in enumerate(THRESHOLDS):
            errors[j] += np.count_nonzero((probs[0] > t) != truth)
        total += truth.size
    best = int(np.argmin(errors))
    return float(errors[best] / total), float(THRESHOLDS[best])


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    warm = min(1.0, step / max(args.warmup, 1))
    return args.lr * warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(args: argparse.Namespace, command: str) -> dict:
    channels = parse_channels(args.channels)
    init: tuple[UNet, ModelCard] | None = None
    if args.init is not None:
        init = load_weights(args.init)
        channels = init[1].channels
        if init[1].out_channels != 1:
            raise ValueError(f"--init {args.init} has {init[1].out_channels} outputs, not 1")
    device = resolve_device(args.device)
    geometry = Geometry(len(channels) - 2)
    geometry.check_output(args.output_size)
    pairs = load_pairs(args.data)
    val_idx = parse_slices(args.val_slices, len(pairs))
    train_pairs = [p for i, p in enumerate(pairs) if i not in val_idx]
    val_pairs = [pairs[i] for i in val_idx]
    if not train_pairs:
        raise DataError("every slice is a validation slice: nothing left to train on")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    images = [to_unit(p.image) for p in train_pairs]
    labels = [p.label for p in train_pairs]
    stacked = np.concatenate([im.ravel() for im in images])
    mean, std = float(stacked.mean()), float(stacked.std())
    if init is not None:
        # The network learned its features on the initial weights' input scale.
        mean, std = init[1].normalization.mean[0], init[1].normalization.std[0]
    weights = None
    if args.border_weight > 0 or args.class_balance:
        weights = [
            border_weight_map(lb, args.border_weight, args.border_sigma, args.class_balance)
            for lb in labels
        ]
    sampler = CropSampler(
        images,
        labels,
        weights,
        geometry,
        args.output_size,
        elastic_sigma=args.elastic_sigma,
        elastic_grid=args.elastic_grid,
        jitter=args.jitter,
    )

    model = UNet(channels, 1) if init is None else init[0].train()
    model = model.to(device, memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = args.bn_momentum
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    precision = resolve_precision(args.precision, device)
    if precision == "fp16":  # `auto` on a GPU without bf16: fp16 would need loss scaling
        precision = "fp32"
    # The average's BatchNorm statistics are averaged too (use_buffers), so it is a model
    # that can be validated and saved as is.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
        if args.ema > 0
        else None
    )
    kept = model if ema is None else ema.module  # what is validated and saved
    card = ModelCard(
        name=args.name,
        description=args.description,
        channels=channels,
        out_channels=1,
        class_names=["cell_interior"],
        normalization={"mean": [round(mean, 6)], "std": [round(std, 6)]},
        threshold=0.5,
    )
    training = {
        "command": command,
        "init": None
        if init is None
        else {"weights": args.init.name, "training": _without_history(init[1].training)},
        "seed": args.seed,
        "data": _describe_path(args.data),
        "train_slices": [p.name for p in train_pairs],
        "validation_slices": [p.name for p in val_pairs],
        "steps_planned": args.steps,
        "time_budget_min": args.time_budget_min,
        "batch_size": args.batch_size,
        "bn_momentum": args.bn_momentum,
        "precision": precision,
        "ema_decay": args.ema or None,
        "output_size": args.output_size,
        "input_size": args.output_size + geometry.shrink,
        "optimizer": f"Adam lr={args.lr} cosine to 1%, warm-up {args.warmup} steps",
        "loss": "binary cross-entropy"
        + (" x class-balance w_c" if args.class_balance else "")
        + (
            f" + border weight w0={args.border_weight} sigma={args.border_sigma}"
            if args.border_weight > 0
            else ""
        ),
        "augmentation": {
            "elastic_sigma_px": args.elastic_sigma,
            "elastic_grid": args.elastic_grid,
            "flips_rot90": True,
            "intensity_jitter": args.jitter,
            "mirror_padded_borders": True,
        },
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    val_norm = (np.float32(mean), np.float32(std))
    norm_t = [torch.tensor(v) for v in val_norm]

    best = (math.inf, 0.5, 0)
    best_state: dict | None = None
    history: list[list[float]] = []
    start = time.monotonic()
    budget_s = args.time_budget_min * 60 if args.time_budget_min else math.inf
    bar = tqdm(total=args.steps, desc="train", unit="step", disable=args.no_progress)
    loss_avg = None
    step = 0
    while step < args.steps:
        step += 1
        elapsed = time.monotonic() - start
        progress = max(step / args.steps, elapsed / budget_s)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(args, step, progress)
        crops = [sampler.sample(rng) for _ in range(args.batch_size)]
        x = torch.from_numpy(np.stack([c.image for c in crops])[:, None])
        x = ((x - norm_t[0]) / norm_t[1]).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.stack([c.label for c in crops])[:, None]).to(device)
        w = torch.from_numpy(np.stack([c.weight for c in crops])[:, None]).to(device)
        model.train()
        with autocast(precision, device):
            logits = model(x)  # (N, 1, h, w)
        loss = weighted_bce(logits.float(), y, w if weights is not None else None)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        out_of_time = time.monotonic() - start >= budget_s
        if step % args.val_every == 0 or step == args.steps or out_of_time:
            segmenter = Segmenter(kept, card, device=device, precision="fp32")
            err, thr = validate(segmenter, val_pairs)
            history.append([step, round(err, 5), thr])
            if err < best[0]:
                best = (err, thr, step)
                best_state = copy.deepcopy(kept.state_dict())
                _save(kept, card, training, best, history, time.monotonic() - start, args.out)
            tqdm.write(
                f"step {step}: loss {loss_avg:.4f}, val pixel error {err:.4f} at t={thr} "
                f"(best {best[0]:.4f} @ {best[2]}), {(time.monotonic() - start) / 60:.1f} min",
                file=sys.stderr,
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", val=f"{best[0]:.4f}")
        if out_of_time:
            break
    bar.close()
    assert best_state is not None
    kept.load_state_dict(best_state)
    training["stopped"] = "time budget" if step < args.steps else "steps"
    training["steps_run"] = step
    return _save(kept, card, training, best, history, time.monotonic() - start, args.out)


def _without_history(training: dict) -> dict:
    return {k: v for k, v in training.items() if k != "validation_history"}


def _describe_path(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(Path("..") / path.relative_to(REPO_ROOT.parent))
    except ValueError:
        return str(path)


def _save(
    model: UNet,
    card: ModelCard,
    training: dict,
    best: tuple[float, float, int],
    history: list[list[float]],
    elapsed_s: float,
    out: Path,
) -> dict:
    card = card.model_copy(deep=True)
    card.threshold = best[1]
    card.training = {
        **training,
        "best_step": best[2],
        "threshold_tuned_on_validation": best[1],
        "validation_pixel_error_at_best": round(best[0], 5),
        "elapsed_min": round(elapsed_s / 60, 1),
        "validation_history": history,
    }
    # A copy on the CPU: the state being trained stays on its device.
    cpu = UNet(card.channels, card.out_channels)
    cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_weights(cpu, card, out)
    return card.training


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "val_every", "elastic_grid"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.elastic_grid < 2 and args.elastic_sigma > 0:
        parser.error("--elastic-grid must be >= 2")
    if not 0 <= args.ema < 1:
        parser.error("--ema must be in [0, 1)")
    if not 0 < args.bn_momentum <= 1:
        parser.error("--bn-momentum must be in (0, 1]")
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        parser.error("--time-budget-min must be positive")
    argv_list = sys.argv[1:] if argv is None else argv
    command = shlex.join(["unet-train", *argv_list])
    try:
        summary = train(args, command)
    except (DataError, WeightsError, ValueError) as e:
        parser.error(str(e))
    print(
        f"best validation pixel error {summary['validation_pixel_error_at_best']} at step "
        f"{summary['best_step']} (threshold {summary['threshold_tuned_on_validation']}), "
        f"{summary['steps_run']} steps in {summary['elapsed_min']} min -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
