"""In-process limits: matrix-multiply FLOP/s (the practical peak) and the engine's own tile
throughput, measured in the same process, on the same device, one after the other."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from unet_service.core.engine import Segmenter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of an n^3 matrix multiply: what this device's cores practically reach."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, device, repeats))


def flops_per_tile(seg: Segmenter, tile_size: int) -> int:
    size = tile_size + seg.geometry.shrink
    x = torch.zeros(1, seg.card.in_channels, size, size, device=seg.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        seg.model(x)
    return counter.get_total_flops()


@dataclass
class EngineResult:
    backend: str
    precision: str
    tile_size: int
    batch: int
    seconds: float  # median per forward pass
    spread: float  # (max - min) / median over repeats
    flops: float  # per forward pass

    @property
    def output_mpix_s(self) -> float:
        return self.batch * self.tile_size**2 / self.seconds / 1e6

    @property
    def flop_s(self) -> float:
        return self.flops / self.seconds


def engine_throughput(
    seg: Segmenter, tile_size: int, batches: list[int], repeats: int
) -> list[EngineResult]:
    rng = np.random.default_rng(0)
    size = tile_size + seg.geometry.shrink
    per_tile = flops_per_tile(seg, tile_size)
    results = []
    for n in batches:
        tiles = rng.standard_normal((n, seg.card.in_channels, size, size)).astype(np.float32)
        times = timed(lambda t=tiles: seg.forward(t), seg.device, repeats)
        median = statistics.median(times)
        results.append(
            EngineResult(
                seg.backend.name,
                seg.precision,
                tile_size,
                n,
                median,
                (max(times) - min(times)) / median,
                per_tile * n,
            )
        )
    return results
