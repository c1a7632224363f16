"""Helpers for the service tests: a tiny real UNet saved as real weights, real images as
upload bytes, and an in-process app with its lifespan running."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import tifffile
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import TINY_CHANNELS, isbi_slice, tiny_unet
from unet_service.api.app import create_app
from unet_service.core.engine import Segmenter
from unet_service.core.weights import ModelCard, save_weights
from unet_service.pipeline.instances import InstanceParams
from unet_service.serving.service import InferenceService
from unet_service.settings import Settings

# Depth 2: legal output tiles are 4 + 4j; 60 gives buckets 16 / 32 / 60 and input tiles 100.
TILE = 60


def save_tiny(tmp_path: Path, out_channels: int = 1, name: str = "tiny", seed: int = 0) -> Path:
    """A tiny random UNet. Its outputs sit in a narrow band around 0.49, so for one class the
    card's threshold is set to the median on a real EM slice: masks then have both values
    and comparisons of masks test something."""
    card = ModelCard(
        name=name,
        channels=TINY_CHANNELS,
        out_channels=out_channels,
        class_names=[f"class{i}" for i in range(out_channels)],
        normalization={"mean": [0.5], "std": [0.25]},
    )
    model = tiny_unet(out_channels=out_channels, seed=seed)
    if out_channels > 1:
        # Centre each class's logit on real data, so the arg-max varies over the image.
        pixels = isbi_slice(0)[:140, :140].astype(np.float32) / 255
        x = torch.from_numpy((pixels - 0.5) / 0.25)[None, None]
        with torch.no_grad():
            model.head.bias -= model(x).mean(dim=(0, 2, 3))
    if out_channels == 1:
        seg = Segmenter(model, card, device="cpu", backend="torch")
        probs = seg.segment(isbi_slice(0)[:200, :200, None], TILE, probabilities=True)
        assert probs.probabilities is not None
        card.threshold = float(np.median(probs.probabilities))
        # Seeds for cell instances just above it, so that instances have cells too.
        top = float(np.quantile(probs.probabilities, 0.9))
        card.instances = InstanceParams(seed_threshold=top, min_size=4)
    return save_weights(model, card, tmp_path / f"{name}.safetensors")


def settings(weights: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "weights": weights,
        "tile_size": TILE,
        "max_batch_tiles": 8,
        "max_wait_ms": 5,
        "backend": "torch",
        "device": "cpu",
    }
    values.update(overrides)
    return Settings(**values)


def em_crop(index: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    """A real 8-bit EM crop, (H, W)."""
    return np.ascontiguousarray(isbi_slice(index)[top : top + height, left : left + width])


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def to_uint16(pixels: np.ndarray) -> np.ndarray:
    """8-bit EM -> a real 16-bit image using the whole range (with a low-bit texture, so the
    16-bit values matter)."""
    rng = np.random.default_rng(0)
    return (pixels.astype(np.uint16) * 257 + rng.integers(0, 200, pixels.shape)).astype(np.uint16)


def tiff_bytes(*pages: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for page in pages:
            tif.write(page)
    return buf.getvalue()


def service_of(app: FastAPI) -> InferenceService:
    service = app.state.service
    assert service is not None
    return service


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, and an async client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def make_app(weights: Path, **overrides: object) -> FastAPI:
    return create_app(settings(weights, **overrides))


class Gate:
    """Wraps the real forward pass so a test can hold the worker inside a batch."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("gate never released")
        return self.forward(batch)


@contextlib.contextmanager
def wrapped_forward(service: InferenceService, wrapper: Callable) -> Iterator[None]:
    """Route the service's forward passes through `wrapper` for the block (the engine's
    `forward` is looked up on each pass, so an instance attribute takes its place)."""
    segmenter = service.segmenter
    shadowed = segmenter.__dict__.get("forward")  # another wrapper already in place
    segmenter.forward = wrapper
    try:
        yield
    finally:
        if shadowed is None:
            del segmenter.forward
        else:
            segmenter.forward = shadowed


@contextlib.contextmanager
def gated(service: InferenceService) -> Iterator[Gate]:
    """Route the service's forward passes through a Gate for the block; the gate is
    released at its end, whatever happened, so the worker never stays stuck."""
    gate = Gate(service.segmenter.forward)
    with wrapped_forward(service, gate):
        try:
            yield gate
        finally:
            gate.release.set()


class Stepper:
    """Wraps the real forward pass so each pass waits for a permit: a test decides exactly
    how many passes run, and so orders events without timing them."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.entered = threading.Event()
        self._permits = threading.Semaphore(0)
        self._done = threading.Condition()
        self.completed = 0
        self.opened = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        if not self.opened and not self._permits.acquire(timeout=30):
            raise TimeoutError("no permit for a forward pass")
        try:
            return self.forward(batch)
        finally:
            with self._done:
                self.completed += 1
                self._done.notify_all()

    async def allow(self, passes: int) -> None:
        """Let `passes` more forward passes run, and return once they have."""
        target = self.completed + passes
        self._permits.release(passes)

        def wait() -> None:
            with self._done:
                if not self._done.wait_for(lambda: self.completed >= target, timeout=30):
                    raise TimeoutError(f"{passes} forward pass(es) never ran")

        await asyncio.to_thread(wait)

    def open(self) -> None:
        """Let every pass run from now on."""
        self.opened = True
        self._permits.release(1000)


@contextlib.contextmanager
def stepped(service: InferenceService) -> Iterator[Stepper]:
    stepper = Stepper(service.segmenter.forward)
    with wrapped_forward(service, stepper):
        try:
            yield stepper
        finally:
            stepper.open()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (a metric that
    has a `model` label sums over the models unless one is named), 0 when there are none."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample, sample_labels), value in metric_samples(text).items()
        if sample == name and wanted <= set(sample_labels)
    )


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The samples called `name` with `labels` from the app's /metrics, summed (see
    metric_total)."""
    return metric_total((await client.get("/metrics")).text, name, **labels)


def binary_infer(
    pixels: np.ndarray, datatype: str, outputs: list[str], **extra: object
) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request with the binary tensor extension, as tritonclient sends it: the
    JSON header, then the image's raw little-endian bytes; the outputs come back binary."""
    raw = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    tensor = {"name": "image", "shape": list(pixels.shape), "datatype": datatype}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
            **extra,
        }
    ).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}
