"""What cell instances cost in the process, side by side with the whole-image watershed
they replaced: time on one 512 x 512 ISBI slice, and peak memory per pixel at 8192 x 8192
(the shipped model's probabilities of that slice, mirrored out to the size). Targets: the
service's instances add at most 20 % to a 512 x 512 request (`bench.outputs` measures that
over HTTP), and stay near 6 bytes per pixel (UNET_MAX_INSTANCE_PIXELS is sized from it).

`python -m bench.instances` prints a Markdown table. Each memory figure is the peak
resident size of a fresh process while it labels the map, above the map itself."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage.filters import gaussian
from skimage.measure import label
from skimage.segmentation import watershed

from unet_service.core.engine import Segmenter
from unet_service.imaging.decode import decode_image
from unet_service.options import DEFAULT_WEIGHTS
from unet_service.pipeline.instances import InstanceParams, label_instances

SLICE = Path(__file__).resolve().parent.parent.parent / "shared/data/isbi2012/test/05.png"


def whole_image_watershed(
    probability: np.ndarray, threshold: float, params: InstanceParams
) -> np.ndarray:
    """The previous implementation (min_size aside), for comparison: one scikit-image
    watershed of the whole map."""
    prob = probability.astype(np.float32, copy=False)
    if params.smoothing > 0:
        prob = gaussian(prob, sigma=params.smoothing, preserve_range=True).astype(np.float32)
    seeds = label(prob > max(params.seed_threshold, threshold), connectivity=1)
    depth = np.rint((1 - prob) * 255).astype(np.uint8)
    return watershed(depth, markers=seeds, mask=prob > threshold).astype(np.uint32)


IMPLEMENTATIONS: dict[str, Callable[[np.ndarray, float, InstanceParams], np.ndarray]] = {
    "per region (pipeline.instances)": label_instances,
    "whole-image watershed (before)": whole_image_watershed,
}


def slice_map(weights: Path) -> tuple[np.ndarray, float, InstanceParams]:
    seg = Segmenter.from_weights(weights, device="cpu")
    image = decode_image(SLICE.read_bytes())
    probs = seg.segment(image, probabilities=True).probabilities
    assert probs is not None
    return probs[0], seg.card.threshold, seg.card.instances or InstanceParams()


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up, and is not counted
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def peak_bytes_per_pixel(name: str, path: Path, threshold: float, params: InstanceParams) -> float:
    """Run one implementation in a fresh process; its peak RSS above the loaded map."""
    args = [sys.executable, "-m", "bench.instances", "--child", name, str(path), str(threshold)]
    out = subprocess.run(
        [*args, params.model_dump_json()], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def child(name: str, path: Path, threshold: float, params_json: str) -> None:
    prob = np.load(path)
    status = Path("/proc/self/status")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _rss(status.read_text(), "VmRSS")
    IMPLEMENTATIONS[name](prob, threshold, InstanceParams.model_validate_json(params_json))
    peak = _rss(status.read_text(), "VmHWM")
    print((peak - before) / prob.size)


def _rss(text: str, field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    assert match is not None
    return int(match.group(1)) * 1024


def measure(repeats: int, size: int, weights: Path = DEFAULT_WEIGHTS) -> list[list[object]]:
    prob, threshold, params = slice_map(weights)
    reps = -(-size // prob.shape[0])
    big = np.pad(prob, [(0, (reps - 1) * n) for n in prob.shape], mode="symmetric")
    big = np.ascontiguousarray(big[:size, :size])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.npy"
        np.save(path, big)
        del big
        for name, fn in IMPLEMENTATIONS.items():
            ms = time_ms(lambda fn=fn: fn(prob, threshold, params), repeats)
            rows.append([name, ms, peak_bytes_per_pixel(name, path, threshold, params)])
    return rows


def markdown(rows: list[list[object]], size: int) -> list[str]:
    base_ms, base_bytes = rows[-1][1], rows[-1][2]
    lines = [
        f"| instances | 512x512 ms | / before | {size}x{size} peak bytes / pixel | / before |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {bpp:.1f} | {bpp / base_bytes:.2f} |"
        for name, ms, bpp in rows
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.instances", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--size", type=int, default=8192, help="side of the memory measurement")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, path, threshold, params = args.child
        child(name, Path(path), float(threshold), params)
        return 0
    print("\n".join(markdown(measure(args.repeats, args.size), args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
