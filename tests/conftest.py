"""Shared fixtures: tiny real UNets saved as real weights, and real ISBI EM images."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from postgres_server import PostgresServer, postgres_server, why_not

from unet_service.core.unet import UNet
from unet_service.core.weights import ModelCard, save_weights

REPO = Path(__file__).resolve().parent.parent
ISBI = REPO.parent / "shared" / "data" / "isbi2012"
TINY_CHANNELS = [1, 4, 8, 16]  # depth 2: shrink 40, margin 20, legal outputs 4 + 4j


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial statistics so eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def tiny_unet(channels: list[int] = TINY_CHANNELS, out_channels: int = 1, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize_batchnorm(UNet(channels, out_channels), seed).eval()


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A tiny real UNet with its card, as the service and the CLI load it."""
    card = ModelCard(
        name="tiny",
        channels=TINY_CHANNELS,
        class_names=["cell_interior"],
        normalization={"mean": [0.5], "std": [0.25]},
    )
    return save_weights(tiny_unet(), card, tmp_path / "tiny.safetensors")


def isbi_slice(index: int = 0) -> np.ndarray:
    """A real 512x512 8-bit EM slice from the ISBI 2012 training set, (H, W)."""
    path = ISBI / "train" / "image" / f"{index:02d}.png"
    if not path.is_file():
        pytest.skip(f"ISBI data not found at {ISBI}")
    return np.asarray(Image.open(path))


def read_volume(data: bytes | Path) -> np.ndarray:
    """A TIFF as napari and scikit-image read it (`tifffile.imread`), after checking that it is
    one series whose ImageJ hyperstack description makes its pages the slices of one stack,
    as Fiji opens it."""
    with tifffile.TiffFile(io.BytesIO(data) if isinstance(data, bytes) else data) as tif:
        assert tif.is_imagej and len(tif.series) == 1
        meta = tif.imagej_metadata or {}
        pages = len(tif.pages)
        assert meta["images"] == pages and int(meta.get("slices", 1)) == pages
        assert "channels" not in meta and "frames" not in meta
    return tifffile.imread(io.BytesIO(data) if isinstance(data, bytes) else data)


def isbi_pairs(folder: Path, indices: list[int], box: tuple[int, int, int, int]) -> Path:
    """A training-style FOLDER/image + FOLDER/label of real ISBI slices cropped to BOX
    (left, top, right, bottom), keeping their file names."""
    if not (ISBI / "train").is_dir():
        pytest.skip(f"ISBI data not found at {ISBI}")
    for sub in ("image", "label"):
        (folder / sub).mkdir(parents=True)
        for i in indices:
            src = Image.open(ISBI / "train" / sub / f"{i:02d}.png")
            src.crop(box).save(folder / sub / f"{i:02d}.png")
    return folder


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (marked anyio) run on asyncio, the loop uvicorn serves on."""
    return "asyncio"


@pytest.fixture
def em_slice() -> np.ndarray:
    return isbi_slice(0)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (skips with the reason without one)."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


@pytest.fixture(autouse=True, scope="session")
def jobs_dir_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every app a test starts keeps its section jobs in a temporary folder unless the test
    names one (the default, ./jobs, would be the checkout's)."""
    previous = os.environ.get("UNET_JOBS_DIR")
    os.environ["UNET_JOBS_DIR"] = str(tmp_path_factory.mktemp("jobs"))
    yield
    if previous is None:
        del os.environ["UNET_JOBS_DIR"]
    else:
        os.environ["UNET_JOBS_DIR"] = previous
