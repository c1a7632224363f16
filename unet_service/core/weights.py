"""Weights on disk: `NAME.safetensors` (tensors only, never unpickled) and `NAME.json`, the
model card beside it (architecture, input normalisation, threshold, provenance, metrics)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unet_service.core.card_metrics import current_metrics, current_training, metrics_summary
from unet_service.core.unet import UNet
from unet_service.pipeline.instances import InstanceParams

CARD_FORMAT = "unet-service/1"


class WeightsError(ValueError):
    """A weights file or card that is missing, truncated, malformed or does not fit."""


class Normalization(BaseModel):
    """Pixels are first scaled to [0, 1] by their type's range (uint8 / 255, uint16 / 65535;
    floats are taken as already in [0, 1]), then (x - mean) / std per channel."""

    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be positive")
        return v


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = CARD_FORMAT
    name: str = "unet"
    description: str = ""
    channels: list[int]
    out_channels: int = 1
    class_names: list[str] = Field(default_factory=lambda: ["foreground"])
    normalization: Normalization = Field(default_factory=Normalization)
    threshold: float = 0.5
    # Set when the weights were validated for one precision only (see core.precision).
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    # How cell instances are cut out of the probabilities (pipeline.instances); None: defaults.
    instances: InstanceParams | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if len(v) < 3 or any(c < 1 for c in v):
            raise ValueError("channels needs the input channels and at least two positive levels")
        return v

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        # Cards written before `pixel_error` meant only the challenge's scale.
        return current_metrics(v) if isinstance(v, dict) else v

    @field_validator("training", mode="before")
    @classmethod
    def _training_names(cls, v: Any) -> Any:
        return current_training(v) if isinstance(v, dict) else v

    def metrics_summary(self) -> dict[str, dict[str, Any]]:
        """The headline validation figures, defined (see core.card_metrics)."""
        validation = [str(s) for s in self.training.get("validation_slices", [])]
        return metrics_summary(self.metrics, self.threshold, validation)

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def depth(self) -> int:
        return len(self.channels) - 2

    def check_consistent(self) -> None:
        n = self.in_channels
        norm = self.normalization
        if len(norm.mean) not in (1, n) or len(norm.std) not in (1, n):
            raise ValueError(f"normalization needs 1 or {n} mean/std values")
        expected_names = max(self.out_channels, 1)
        if len(self.class_names) != expected_names:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, out_channels is "
                f"{self.out_channels}"
            )


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes owner-only files; weights are meant to be read by others (containers
        # run as another user), so give the usual mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: UNet, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write the tensors and the card, each atomically (a crash leaves the old pair)."""
    path = Path(path)
    if list(model.config.channels) != card.channels or model.config.out_channels != (
        card.out_channels
    ):
        raise WeightsError("the card's channels/out_channels do not match the model")
    card.check_consistent()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CARD_FORMAT, "channels": json.dumps(card.channels)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    text = card.model_dump_json(indent=2) + "\n"
    _atomic_write(card_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


def load_card(path: str | os.PathLike) -> ModelCard:
    cpath = card_path(Path(path))
    if not cpath.is_file():
        raise WeightsError(f"model card {cpath} not found (it must sit beside the weights)")
    try:
        card = ModelCard.model_validate(json.loads(cpath.read_text()))
        card.check_consistent()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"model card {cpath} is not valid JSON: {e}") from None
    except (ValidationError, ValueError) as e:
        first = str(e).splitlines()
        raise WeightsError(f"model card {cpath} is invalid: {' '.join(first[:3])}") from None
    return card


def load_weights(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[UNet, ModelCard]:
    """Load a UNet in eval mode and its card. Raises WeightsError with one clear sentence."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    card = load_card(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"weights file {path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    model = UNet(card.channels, card.out_channels)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not match its card (channels={card.channels}, "
            f"out_channels={card.out_channels}): {len(missing)} missing tensors "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise WeightsError(
                f"weights file {path} does not match its card (channels={card.channels}): "
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(device).eval(), card
