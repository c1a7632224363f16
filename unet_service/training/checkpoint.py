"""What a run leaves behind: the card's record of how the model was made, and the best
validation checkpoint, written atomically (`.safetensors` + card) each time it improves so
that stopping the run at any time leaves a usable model."""

from __future__ import annotations

import copy
import math
import platform
from pathlib import Path
from typing import Any

import torch

from unet_service.core.geometry import Geometry
from unet_service.core.unet import UNet
from unet_service.core.weights import ModelCard, save_weights
from unet_service.training.batches import TrainingData
from unet_service.training.config import TrainConfig
from unet_service.training.data import REPO_ROOT
from unet_service.training.validate import Validation


def new_card(
    config: TrainConfig, channels: list[int], data: TrainingData, init_card: ModelCard | None
) -> ModelCard:
    """The card the checkpoints are written with (threshold and record filled in on save).
    Its normalisation is the training pixels' mean and std on the [0, 1] scale, or, when
    fine-tuning, the initial weights': their features were learned on that input scale."""
    mean, std = data.mean, data.std
    if init_card is not None:
        mean, std = init_card.normalization.mean[0], init_card.normalization.std[0]
    # The initial weights' instance parameters are the ones validation cuts instances with
    # (--select instances), so they go with the checkpoints too.
    instances = None if init_card is None else init_card.instances
    return ModelCard(
        name=config.name,
        description=config.description,
        channels=channels,
        out_channels=1,
        class_names=["cell_interior"],
        normalization={"mean": [round(mean, 6)], "std": [round(std, 6)]},
        threshold=0.5,
        instances=instances,
    )


def provenance(
    config: TrainConfig,
    command: str,
    init_card: ModelCard | None,
    data: TrainingData,
    geometry: Geometry,
    precision: str,
    device: torch.device,
) -> dict[str, Any]:
    """The card's `training` record: enough to reproduce the run and judge its numbers."""
    return {
        "command": command,
        "init": None
        if init_card is None
        else {"weights": Path(config.init).name, "training": _without_history(init_card.training)},
        "seed": config.seed,
        "data": _describe_path(config.data),
        "train_slices": [p.name for p in data.train_pairs],
        "validation_slices": [p.name for p in data.val_pairs],
        "steps_planned": config.steps,
        "time_budget_min": config.time_budget_min,
        "batch_size": config.batch_size,
        "bn_momentum": config.bn_momentum,
        "precision": precision,
        "selected_by": "instance Rand error" if config.select == "instances" else "mismatch",
        "ema_decay": config.ema or None,
        "output_size": config.output_size,
        "input_size": config.output_size + geometry.shrink,
        "optimizer": f"Adam lr={config.lr} cosine to 1%, warm-up {config.warmup} steps",
        "loss": "binary cross-entropy"
        + (" x class-balance w_c" if config.class_balance else "")
        + (
            f" + border weight w0={config.border_weight} sigma={config.border_sigma}"
            if config.border_weight > 0
            else ""
        )
        + (f" + {config.skeleton_weight} x membrane clDice" if config.skeleton_weight > 0 else ""),
        "augmentation": {
            "elastic_sigma_px": config.elastic_sigma,
            "elastic_grid": config.elastic_grid,
            "flips_rot90": True,
            "intensity_jitter": config.jitter,
            "mirror_padded_borders": True,
        },
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }


class Checkpoints:
    """The best validation so far (by mismatch, or by the instances' Rand error with
    `select="instances"`), its step, its weights in memory and on disk at `out`, and the
    whole validation history."""

    def __init__(
        self,
        card: ModelCard,
        training: dict[str, Any],
        out: Path,
        select: str = "pixel",
        snapshots: bool = False,
    ) -> None:
        self.card = card
        self.training = training
        self.out = out
        self.select = select
        self.snapshots = snapshots
        self.best: tuple[float, Validation, int] = (math.inf, Validation(math.inf, 0.5), 0)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[list[float]] = []

    def record(
        self, model: torch.nn.Module, step: int, validation: Validation, elapsed_s: float
    ) -> None:
        entry = [step, round(validation.mismatch, 5), validation.threshold]
        if validation.rand_error is not None:
            entry += [round(validation.rand_error, 5), validation.seed_threshold]
        self.history.append(entry)
        if self.snapshots:  # every validated state, to choose among afterwards
            snapshot = self.out.with_name(f"{self.out.stem}.step{step:05d}{self.out.suffix}")
            self.save(model, elapsed_s, (validation, step), snapshot)
        key = validation.mismatch
        if self.select == "instances":
            assert validation.rand_error is not None, "instance selection scores instances"
            key = validation.rand_error
        if key < self.best[0]:
            self.best = (key, validation, step)
            self.best_state = copy.deepcopy(model.state_dict())
            self.save(model, elapsed_s, (validation, step), self.out)

    def finish(
        self, model: torch.nn.Module, steps_run: int, stopped: str, elapsed_s: float
    ) -> dict[str, Any]:
        """Write the best checkpoint with how the run ended; returns its training record."""
        assert self.best_state is not None, "the last step always validates"
        model.load_state_dict(self.best_state)
        self.training["stopped"] = stopped
        self.training["steps_run"] = steps_run
        return self.save(model, elapsed_s, self.best[1:], self.out)

    def save(
        self,
        model: torch.nn.Module,
        elapsed_s: float,
        chosen: tuple[Validation, int],
        path: Path,
    ) -> dict[str, Any]:
        """Write `model` as the checkpoint validated as `chosen` (at its step) to `path`."""
        card = self.card.model_copy(deep=True)
        best, step = chosen
        card.threshold = best.threshold
        rand = {}
        if best.rand_error is not None:
            rand = {"validation_instance_rand_error_at_best": round(best.rand_error, 5)}
            if card.instances is not None and best.seed_threshold is not None:
                card.instances.seed_threshold = best.seed_threshold
        card.training = {
            **self.training,
            "best_step": step,
            "threshold_tuned_on_validation": best.threshold,
            "validation_mismatch_at_best": round(best.mismatch, 5),
            **rand,
            "elapsed_min": round(elapsed_s / 60, 1),
            "validation_history": self.history,
        }
        # A copy on the CPU: the state being trained stays on its device.
        cpu = UNet(card.channels, card.out_channels)
        cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        save_weights(cpu, card, path)
        return card.training


def _without_history(training: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in training.items() if k != "validation_history"}


def _describe_path(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(Path("..") / path.relative_to(REPO_ROOT.parent))
    except ValueError:
        return str(path)
