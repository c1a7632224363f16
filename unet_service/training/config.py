"""What `unet-train` is asked to do: one dataclass of every option, its command line, and the
checks that turn a bad value into a one-line usage error before any data is read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from unet_service.training.data import DEFAULT_DATA, DEFAULT_VALIDATION


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults here are the command line's defaults too."""

    data: Path = DEFAULT_DATA
    out: Path = Path("runs/unet.safetensors")
    channels: str = "1,16,32,64,128,256"
    val_slices: str = ",".join(map(str, DEFAULT_VALIDATION))
    steps: int = 6000
    time_budget_min: float | None = None
    batch_size: int = 2
    output_size: int = 196
    lr: float = 1e-3
    bn_momentum: float = 0.1
    precision: str = "fp32"
    ema: float = 0.0
    warmup: int = 50
    border_weight: float = 0.0
    border_sigma: float = 5.0
    class_balance: bool = False
    skeleton_weight: float = 0.0
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    jitter: float = 0.1
    val_every: int = 200
    select: str = "pixel"
    snapshots: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    init: Path | None = None
    name: str = "unet"
    description: str = ""
    no_progress: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def check(self) -> None:
        """Raise ValueError, worded for the command line, for a value no run can use."""
        for name in ("steps", "batch_size", "val_every", "elastic_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.elastic_grid < 2 and self.elastic_sigma > 0:
            raise ValueError("--elastic-grid must be >= 2")
        if not 0 <= self.ema < 1:
            raise ValueError("--ema must be in [0, 1)")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError("--bn-momentum must be in (0, 1]")
        if self.skeleton_weight < 0:
            raise ValueError("--skeleton-weight must be >= 0")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise ValueError("--time-budget-min must be positive")

    def channel_list(self) -> list[int]:
        try:
            ch = [int(c) for c in self.channels.split(",")]
        except ValueError:
            raise ValueError(
                f"--channels {self.channels!r} is not a comma-separated list of ints"
            ) from None
        if len(ch) < 3 or any(c < 1 for c in ch):
            raise ValueError("--channels needs the input channels and at least two positive levels")
        return ch


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig
    p = argparse.ArgumentParser(
        prog="unet-train",
        description="Train a UNet on DATA/image + DATA/label pairs (label > half range = "
        "foreground) and write the best validation checkpoint as .safetensors + card.",
    )
    p.add_argument("--data", type=Path, default=d.data, help="folder with image/, label/")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--channels", default=d.channels, help="input channels, then levels")
    p.add_argument(
        "--val-slices",
        default=d.val_slices,
        help="held-out pair indices (sorted by name), e.g. 20,21,22,23 or 20-23",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (upper bound)")
    p.add_argument(
        "--time-budget-min", type=float, default=d.time_budget_min, help="stop after this long"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--output-size", type=int, default=d.output_size, help="output crop size (legal size)"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="Adam peak learning rate (cosine)")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=d.bn_momentum,
        help="BatchNorm running-statistics momentum; smaller averages over more of the small "
        "batches, steadying the statistics used at inference",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default=d.precision,
        help="forward-pass autocast; auto = bf16 where the device runs it fast (AMX / AVX-512 "
        "BF16 CPUs, recent GPUs), else fp32. Weights, optimiser and loss stay fp32",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999) "
        "and validate and save it instead of the raw weights; 0 = off",
    )
    p.add_argument(
        "--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps"
    )
    p.add_argument(
        "--border-weight", type=float, default=d.border_weight, help="w0 of the paper; 0 = off"
    )
    p.add_argument("--border-sigma", type=float, default=d.border_sigma)
    p.add_argument("--class-balance", action="store_true", help="class-frequency weights w_c")
    p.add_argument(
        "--skeleton-weight",
        type=float,
        default=d.skeleton_weight,
        help="add this times the membranes' clDice loss (gaps in membrane centre lines, which "
        "merge cells, and spurious lines, which split them); 0 = off",
    )
    p.add_argument(
        "--elastic-sigma", type=float, default=d.elastic_sigma, help="px; 0 = no deformation"
    )
    p.add_argument("--elastic-grid", type=int, default=d.elastic_grid)
    p.add_argument("--jitter", type=float, default=d.jitter, help="intensity jitter amount")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validate every N steps")
    p.add_argument(
        "--select",
        choices=["pixel", "instances"],
        default=d.select,
        help="keep the checkpoint with the lowest validation mismatch (fraction of pixels unlike "
        "the label, at its best threshold), or the lowest Rand error of its cell instances (cut "
        "with the --init card's instance parameters, else the defaults, with the best of a few "
        "seed thresholds; at the mismatch's best threshold)",
    )
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="also keep every validated checkpoint, as OUT's name + .stepNNNNN",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads (0 = torch's default); 1 is fastest when other processes share the cores",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=d.init,
        help="start from these weights (fine-tuning): their channels and normalisation are kept",
    )
    p.add_argument("--name", default=d.name)
    p.add_argument("--description", default=d.description)
    p.add_argument("--no-progress", action="store_true")
    return p
