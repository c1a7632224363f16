"""The runtimes agree with the plain PyTorch network, and results do not depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CHANNELS, tiny_unet
from unet_service.core.backends import choose_backend, fold_batchnorm, onnxruntime_available
from unet_service.core.engine import Segmenter
from unet_service.core.weights import ModelCard

CARD = ModelCard(channels=TINY_CHANNELS)
CPU = torch.device("cpu")


def tiles(n: int = 5, size: int = 76, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32)


def reference(batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(tiny_unet()(torch.from_numpy(batch))).numpy()


def test_folded_batchnorm_matches_the_network() -> None:
    model = tiny_unet()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.from_numpy(tiles())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_backend_matches_pytorch_and_is_batch_independent(backend: str) -> None:
    if backend == "onnxruntime" and not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    seg = Segmenter(tiny_unet(), CARD, device="cpu", backend=backend)
    assert seg.backend.name == backend
    batch = tiles()
    together = seg.forward(batch)
    assert np.abs(together - reference(batch)).max() <= 1e-4
    # Each tile alone, and the same tile beside other tiles, give the same result.
    alone = np.concatenate([seg.forward(batch[i : i + 1]) for i in range(len(batch))])
    assert np.abs(alone - together).max() <= 1e-5
    # Other tile sizes go through the same exported graph (dynamic axes).
    small = tiles(2, 48)
    assert np.abs(seg.forward(small) - reference(small)).max() <= 1e-4


def test_backend_choice() -> None:
    expected = "onnxruntime" if onnxruntime_available() else "torch"
    assert choose_backend("auto", CPU, "fp32") == expected
    assert choose_backend("auto", CPU, "bf16") == "torch"
    assert choose_backend("auto", torch.device("cuda"), "fp32") == "torch"
    with pytest.raises(ValueError, match="fp32 on the CPU only"):
        choose_backend("onnxruntime", torch.device("cuda"), "fp16")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("tensorrt", CPU, "fp32")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_path(precision: str) -> None:
    seg = Segmenter(tiny_unet(), CARD, device="cuda", precision=precision)
    assert seg.backend.name == "torch" and seg.device.type == "cuda"
    batch = tiles()
    tol = 1e-4 if precision == "fp32" else 5e-2
    assert np.abs(seg.forward(batch) - reference(batch)).max() <= tol
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 1), dtype=np.uint8)
    cpu = Segmenter(tiny_unet(), CARD, device="cpu").segment(image, tile_size=60)
    gpu = seg.segment(image, tile_size=60)
    assert (gpu.mask == cpu.mask).mean() >= 0.99


@pytest.mark.slow
def test_compiled_torch_backend_matches_eager_for_any_batch_size() -> None:
    """torch.compile with static shapes: batches are padded to a power of two, results cut
    back, and nothing of the padding leaks into the real tiles."""
    compiled = Segmenter(tiny_unet(), CARD, device="cpu", backend="auto", compile=True)
    eager = Segmenter(tiny_unet(), CARD, device="cpu", backend="torch")
    assert compiled.backend.name == "torch" and compiled.backend.compiled
    batch = tiles(3, 60)
    assert compiled.forward(batch).shape == (3, 1, 20, 20)
    assert np.abs(compiled.forward(batch) - eager.forward(batch)).max() <= 1e-5
    assert np.abs(compiled.forward(batch[:1]) - eager.forward(batch[:1])).max() <= 1e-5
    with pytest.raises(ValueError, match="torch backend"):
        Segmenter(tiny_unet(), CARD, device="cpu", backend="onnxruntime", compile=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_via_compile() -> None:
    seg = Segmenter(tiny_unet(), CARD, device="cuda", precision="bf16", compile=True)
    batch = tiles(3, 60)
    first = seg.forward(batch)
    # A replay with other data must not overwrite the first result (outputs are cloned).
    seg.forward(tiles(3, 60, seed=1))
    assert np.abs(first - reference(batch)).max() <= 5e-2


@pytest.mark.slow
def test_warm_up_compiles_every_batch_shape_before_traffic() -> None:
    """Batches of any size up to the limit are padded to a power of two; the warm-up
    compiles each of those graphs, so no batch compiles during live traffic."""
    compiled = Segmenter(tiny_unet(), CARD, device="cpu", compile=True)
    assert compiled.backend.batch_shapes(3) == [1, 2, 4]
    assert compiled.warm_up([20], max_batch=3) == 3
    with torch.compiler.set_stance("fail_on_recompile"):
        for n in (1, 2, 3):
            assert compiled.forward(tiles(n, 60)).shape == (n, 1, 20, 20)
    eager = Segmenter(tiny_unet(), CARD, device="cpu")
    assert eager.backend.batch_shapes(8) == [1]
    assert eager.warm_up([20, 60], max_batch=8) == 2
