"""The optimisation: Adam on the network with a warmed-up cosine learning rate, bf16
autocast where asked, an optional moving average of the weights, and one step of it."""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unet_service.core.precision import Precision, autocast, resolve_precision
from unet_service.core.unet import UNet
from unet_service.training.config import TrainConfig
from unet_service.training.losses import membrane_cldice, weighted_bce


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then a cosine from the peak down to 1% of it as `progress` (the larger
    of the steps' and the time budget's fraction used) goes from 0 to 1."""
    warm = min(1.0, step / max(config.warmup, 1))
    return config.lr * warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Learner:
    """The network being trained on its device, its optimiser and its weight average."""

    def __init__(self, model: UNet, config: TrainConfig, device: torch.device) -> None:
        self.model = model.train().to(device, memory_format=torch.channels_last)
        for module in self.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = config.bn_momentum
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.device = device
        self.skeleton_weight = config.skeleton_weight
        precision = resolve_precision(config.precision, device)
        # `auto` on a GPU without bf16 resolves to fp16, which would need loss scaling.
        self.precision: Precision = "fp32" if precision == "fp16" else precision
        # The average's BatchNorm statistics are averaged too (use_buffers), so it is a model
        # that can be validated and saved as is.
        self.ema = (
            AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True
            )
            if config.ema > 0
            else None
        )

    @property
    def kept(self) -> torch.nn.Module:
        """What is validated and saved: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def step(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, lr: float
    ) -> float:
        """One optimiser step on a batch at learning rate `lr`; returns the loss."""
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        with autocast(self.precision, self.device):
            logits = self.model(x)  # (N, 1, h, w)
        # The losses in fp32 whatever the forward pass ran in (a bf16 copy made once).
        logits = logits.float()
        loss = weighted_bce(logits, y, weight)
        if self.skeleton_weight > 0:
            loss = loss + self.skeleton_weight * membrane_cldice(logits, y)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.item()
