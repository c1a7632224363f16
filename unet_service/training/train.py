"""`unet-train`: train a UNet on a folder of image/label pairs with the U-Net paper's recipe
(overlap-tile crops with mirrored borders, elastic deformations, flips/rotations, intensity
jitter, optional border-weighted loss), validating with the real tiled inference path.

The parts: `config` (options), `batches` (data and crops), `optimise` (one step),
`validate` and `checkpoint` (the best model, saved whenever it improves)."""

from __future__ import annotations

import math
import shlex
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from unet_service.core.engine import resolve_device
from unet_service.core.geometry import Geometry
from unet_service.core.normalize import Normalizer
from unet_service.core.unet import UNet
from unet_service.core.weights import ModelCard, WeightsError, load_weights
from unet_service.pipeline.instances import InstanceParams
from unet_service.training.batches import load_training_data
from unet_service.training.checkpoint import Checkpoints, new_card, provenance
from unet_service.training.config import TrainConfig, build_parser
from unet_service.training.data import DataError
from unet_service.training.optimise import Learner, learning_rate
from unet_service.training.validate import Validator


def train(config: TrainConfig, command: str) -> dict:
    """Run the training that `config` describes; returns the saved card's training record."""
    channels, init = _architecture(config)
    device = resolve_device(config.device)
    geometry = Geometry(len(channels) - 2)
    geometry.check_output(config.output_size)
    data = load_training_data(config, geometry)

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    init_card = None if init is None else init[1]
    learner = Learner(UNet(channels, 1) if init is None else init[0], config, device)
    card = new_card(config, channels, data, init_card)
    record = provenance(config, command, init_card, data, geometry, learner.precision, device)
    instances = None
    if config.select == "instances":
        card.instances = instances = card.instances or InstanceParams()
    checkpoints = Checkpoints(card, record, config.out, config.select, config.snapshots)
    validator = Validator(learner.kept, card, device, data.val_pairs, instances)
    # Training inputs are normalised as the card says, by the code that serving runs.
    normalize = Normalizer(card.normalization, 1)

    start = time.monotonic()
    budget_s = config.time_budget_min * 60 if config.time_budget_min else math.inf
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=config.no_progress)
    loss_avg = None
    step = 0
    while step < config.steps:
        step += 1
        progress = max(step / config.steps, (time.monotonic() - start) / budget_s)
        x, y, w = data.batch(rng, config.batch_size, normalize, device)
        loss = learner.step(x, y, w, learning_rate(config, step, progress))
        loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
        out_of_time = time.monotonic() - start >= budget_s
        if step % config.val_every == 0 or step == config.steps or out_of_time:
            v = validator()
            checkpoints.record(learner.kept, step, v, time.monotonic() - start)
            best = checkpoints.best
            rand = "" if v.rand_error is None else f", instance Rand error {v.rand_error:.4f}"
            tqdm.write(
                f"step {step}: loss {loss_avg:.4f}, val mismatch {v.mismatch:.4f} at "
                f"t={v.threshold}{rand} (best {best[0]:.4f} @ {best[2]}), "
                f"{(time.monotonic() - start) / 60:.1f} min",
                file=sys.stderr,
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", val=f"{checkpoints.best[0]:.4f}")
        if out_of_time:
            break
    bar.close()
    stopped = "time budget" if step < config.steps else "steps"
    return checkpoints.finish(learner.kept, step, stopped, time.monotonic() - start)


def _architecture(config: TrainConfig) -> tuple[list[int], tuple[UNet, ModelCard] | None]:
    """The channel list, and the initial weights with their card when fine-tuning (whose
    architecture then wins over --channels)."""
    channels = config.channel_list()  # checked even when the initial weights override it
    if config.init is None:
        return channels, None
    model, card = load_weights(config.init)
    if card.out_channels != 1:
        raise ValueError(f"--init {config.init} has {card.out_channels} outputs, not 1")
    return card.channels, (model, card)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = TrainConfig.from_args(parser.parse_args(argv))
    argv_list = sys.argv[1:] if argv is None else argv
    command = shlex.join(["unet-train", *argv_list])
    try:
        config.check()
        summary = train(config, command)
    except (DataError, WeightsError, ValueError) as e:
        parser.error(str(e))
    print(
        f"best validation mismatch {summary['validation_mismatch_at_best']} at step "
        f"{summary['best_step']} (threshold {summary['threshold_tuned_on_validation']}), "
        f"{summary['steps_run']} steps in {summary['elapsed_min']} min -> {config.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
