"""A bioimage.io package served by us against bioimageio.core's own blockwise prediction of
the same images, side by side in one run:

    .venv/bin/python -m bench.zoo_package [--images 4] [--side 1024] [--rounds 3]

The package is the padded-conv test package (bench/zoo_packages.py: three 3x3 convolutions,
halo 8, inputs 32 + 8n, zero mean and unit variance per sample, sigmoid). The images are EM
images of `--side` pixels cut from mirror-tiled ISBI test slices (bench/workload.em_image).

- ours: the service in process (`create_app`, over httpx's ASGI transport, so HTTP framing,
  PNG decoding and `.npy` encoding are in), `POST /v1/segment?output=probabilities` one image
  at a time, then all at once; UNET_TILE_SIZE 240, so its largest tile takes 256-pixel
  inputs (it picks the cheapest of 64, 120 and 240 per image).
- bioimageio.core: `predict_sample_with_blocking` with blocksize parameter n = 28 (256-pixel
  input blocks, as `predict(..., blocksize_parameter=28)` runs it, but on one pipeline whose
  weights stay loaded: `predict` loads and unloads them on every call), one image at a time.

Both with the same weights, ONNX (ONNX Runtime) and TorchScript in turn; each side's time is
the median of `--rounds`, the two sides alternating which goes first. The answers are compared
too: ours equal bioimageio.core's whole-image prediction, whose sample statistics include the
halo-padded border; its blockwise prediction measures them over the image alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # bioimageio.core's progress bars

import httpx
import numpy as np
import torch

from bench.workload import em_image, png_bytes
from bench.zoo_packages import MIN_SIZE, STEP, build_package
from unet_service.api.app import create_app
from unet_service.settings import Settings

TILE = 240  # our largest output tile: 256-pixel inputs with the halo of 8
BLOCK_N = (TILE + 16 - MIN_SIZE) // STEP  # bioimageio.core's blocks of 256 pixels
FORMATS = {"onnxruntime": "onnx", "torch": "torchscript"}


async def ours(folder: Path, backend: str, images: list[np.ndarray]):
    """Seconds for the images one at a time, and all at once; tiles per image; the first
    image's probabilities."""
    settings = Settings(
        models=folder, tile_size=TILE, backend=backend, device="cpu", log_level="warning"
    )
    app = create_app(settings)
    bodies = [png_bytes(image) for image in images]
    url = "/v1/segment?output=probabilities"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600) as c:

            async def post(body: bytes) -> httpx.Response:
                r = await c.post(url, files={"file": ("em.png", body)})
                r.raise_for_status()
                return r

            first = await post(bodies[0])  # warm
            start = time.perf_counter()
            for body in bodies:
                await post(body)
            one = time.perf_counter() - start
            start = time.perf_counter()
            await asyncio.gather(*(post(body) for body in bodies))
            together = time.perf_counter() - start
    tiles = int(first.headers["x-tiles"])
    return one, together, tiles, np.load(io.BytesIO(first.content))


def core(package: Path, weights_format: str, images: list[np.ndarray]):
    """Seconds for the images one at a time; blocks per image; the first image's blockwise
    and whole-image predictions."""
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_model_description

    descr = load_model_description(package)
    pipeline = create_prediction_pipeline(descr, weights_format=weights_format)

    def sample(image: np.ndarray):
        return create_sample_for_model(descr, inputs=image[None, None], sample_id="em")

    with pipeline:
        n_blocks, _ = sample(images[0]).split_into_blocks(
            descr.get_tensor_sizes({("raw", "y"): BLOCK_N, ("raw", "x"): BLOCK_N}, 1).inputs,
            halo=pipeline._default_input_halo,
            pad_mode=pipeline.pad_mode,
        )
        blockwise = pipeline.predict_sample_with_blocking(sample(images[0]), ns=BLOCK_N)  # warm
        whole = pipeline.predict_sample_without_blocking(sample(images[0]))
        start = time.perf_counter()
        for image in images:
            pipeline.predict_sample_with_blocking(sample(image), ns=BLOCK_N)
        seconds = time.perf_counter() - start

    def values(s) -> np.ndarray:
        return np.asarray(s.members["prob"].data)[0, 0]

    return seconds, n_blocks, values(blockwise), values(whole)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    images = [em_image(args.side, args.side, seed=i) for i in range(args.images)]
    n = len(images)
    cpu = platform.processor() or platform.machine()
    print(f"{n} images of {args.side}x{args.side}; {cpu}, {torch.get_num_threads()} threads")
    print(f"median of {args.rounds} rounds\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        package = build_package(folder / "pkg.zip")
        for backend, weights_format in FORMATS.items():
            ours_one, ours_all, core_times = [], [], []
            for r in range(args.rounds):  # alternate which side goes first
                for side in ("ours", "core") if r % 2 == 0 else ("core", "ours"):
                    if side == "ours":
                        one, together, tiles, answer = asyncio.run(ours(folder, backend, images))
                        ours_one.append(one)
                        ours_all.append(together)
                    else:
                        seconds, blocks, blockwise, whole = core(package, weights_format, images)
                        core_times.append(seconds)
            t_ours, t_all = statistics.median(ours_one), statistics.median(ours_all)
            t_core = statistics.median(core_times)
            rows.append(
                (weights_format, t_ours, t_all, tiles, t_core, blocks, answer, blockwise, whole)
            )
    print(
        "| weights | ours: images/s one at a time (tiles/s) | ours: all at once | "
        "bioimageio.core blockwise: images/s (blocks/s) | ours / core |"
    )
    print("|---|---|---|---|---|")
    for fmt, t_ours, t_all, tiles, t_core, blocks, *_ in rows:
        print(
            f"| {fmt} | {n / t_ours:.3g} ({n * tiles / t_ours:.3g}) | {n / t_all:.3g} | "
            f"{n / t_core:.3g} ({n * blocks / t_core:.3g}) | {t_core / t_ours:.2f}x |"
        )
    print(f"\ntiles per image: ours {rows[0][3]}, bioimageio.core {rows[0][5]} blocks of 256")
    for fmt, *_, answer, blockwise, whole in rows:
        print(
            f"{fmt}: max |ours - core whole image| = {np.abs(answer - whole).max():.2g}, "
            f"|ours - core blockwise| = {np.abs(answer - blockwise).max():.2g}"
        )


if __name__ == "__main__":
    main()
