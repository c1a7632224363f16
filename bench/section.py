"""A huge section through the streaming path: memory above idle per input pixel, and time per
pixel against an in-memory 2048 x 2048 image in the same process (issue #14's targets:
<= 0.25 bytes per input pixel, within 10 % of the 2048 x 2048 time per pixel).

    python -m bench.section                 # 20000 x 20000 (long on a small CPU)
    python -m bench.section --size 8000     # a quicker run

The input is a tiled, deflate-compressed 8-bit TIFF of real ISBI slices, mirrored so that
neighbours meet seamlessly, written tile by tile (never one array). It is segmented by a
child process that loads the model, warms it up, times `Segmenter.segment` on a 2048 x 2048
crop of the same pixels, reads its idle resident memory, resets its peak (VmHWM) and runs
`cli.stream.run_section`; the peak above idle is what streaming costs. The crop is timed
again afterwards and the faster run counts (other work on a shared machine only slows).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from unet_service.options import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS

ISBI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "isbi2012"
TIFF_TILE = 512
REFERENCE_SIDE = 2048


def isbi_slices() -> list[np.ndarray]:
    slices = sorted((ISBI / "train" / "image").glob("*.png"))[:4]
    if not slices:
        raise SystemExit(f"ISBI slices not found under {ISBI}")
    return [np.asarray(Image.open(p).convert("L")) for p in slices]


def tiles(side: int, slices: list[np.ndarray]) -> Iterator[np.ndarray]:
    """TIFF tiles of a side x side mosaic of 512 x 512 slices, every other one mirrored so
    that neighbours share their edge (a plausible EM section, not a grid of seams)."""
    for top in range(0, side, TIFF_TILE):
        for left in range(0, side, TIFF_TILE):
            i, j = top // TIFF_TILE, left // TIFF_TILE
            block = slices[(i * 7 + j) % len(slices)]
            block = block[::-1] if i % 2 else block
            block = block[:, ::-1] if j % 2 else block
            yield np.ascontiguousarray(block[: side - top, : side - left])


def write_section(path: Path, side: int) -> None:
    tifffile.imwrite(
        path,
        tiles(side, isbi_slices()),
        shape=(side, side),
        dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE),
        compression="zlib",
        bigtiff=side * side > 2**31,
        metadata=None,
    )


def status(field: str) -> int:
    """A VmRSS / VmHWM line of this process's status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: dict, results: multiprocessing.Queue) -> None:
    from unet_service.cli.stream import run_section
    from unet_service.core.engine import Segmenter
    from unet_service.imaging.sources import open_source

    seg = Segmenter.from_weights(args["weights"], device=args["device"])
    seg.warm_up([args["tile_size"]], args["batch_size"])
    side = args["side"]
    with open_source(args["input"], max_pixels=side * side, max_pages=1) as source:
        # Also run one page of the real path before measuring idle: the first pass of each
        # shape allocates the runtime's arenas, which an idle server has already done.
        ref_side = min(REFERENCE_SIDE, side)
        image = source.read(0, 0, ref_side, 0, ref_side)
        reference = [segment_seconds(seg, image, args)]  # before, and after: the best
        idle = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start, cpu = time.perf_counter(), cpu_seconds()
        run_section(
            seg,
            source,
            args["output"],
            tile_sizes=args["tile_size"],
            batch_size=args["batch_size"],
        )
        section_s, section_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        peak = status("VmHWM")
    reference.append(segment_seconds(seg, image, args))
    results.put(
        {
            "idle_rss": idle,
            "peak_above_idle": peak - idle,
            "section_s": section_s,
            "section_cpu_s": section_cpu,
            "reference_s": min(wall for wall, _ in reference),
            "reference_cpu_s": min(cpu for _, cpu in reference),
            "reference_runs_s": reference,
            "reference_side": ref_side,
        }
    )


def segment_seconds(seg: Any, image: np.ndarray, args: dict) -> tuple[float, float]:
    """One in-memory `Segmenter.segment` of `image`: (wall, CPU) seconds."""
    start, cpu = time.perf_counter(), cpu_seconds()
    seg.segment(image, args["tile_size"], args["batch_size"])
    return time.perf_counter() - start, cpu_seconds() - cpu


def cpu_seconds() -> float:
    """This process's CPU time, all threads: less disturbed than wall time by other
    processes on a shared machine (though not immune: they share caches and cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="side of the square section")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    p.add_argument("--batch-size", type=int, default=2, help="tiles per pass (CPU: 2)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-section-") as tmp:
        source = Path(tmp) / "section.tif"
        start = time.perf_counter()
        write_section(source, args.size)
        print(
            f"wrote a {args.size}x{args.size} tiled TIFF ({source.stat().st_size >> 20} MiB) "
            f"in {time.perf_counter() - start:.0f} s"
        )
        output = Path(tmp) / "mask.tif"
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()
        job = {
            "weights": str(args.weights),
            "device": args.device,
            "tile_size": args.tile_size,
            "batch_size": args.batch_size,
            "side": args.size,
            "input": str(source),
            "output": str(output),
        }
        proc = context.Process(target=child, args=(job, results))
        proc.start()
        result = results.get()
        proc.join()
        with tifffile.TiffFile(output) as tif:
            page = tif.pages[0]
            assert page.shape == (args.size, args.size) and page.is_tiled
            result["output_mib"] = output.stat().st_size / 2**20

    pixels = args.size**2
    ref_pixels = result["reference_side"] ** 2
    result.update(
        size=args.size,
        bytes_per_pixel=result["peak_above_idle"] / pixels,
        time_ratio=(result["section_s"] / pixels) / (result["reference_s"] / ref_pixels),
        cpu_time_ratio=(result["section_cpu_s"] / pixels)
        / (result["reference_cpu_s"] / ref_pixels),
        load_average=os.getloadavg(),
    )
    print(json.dumps(result, indent=2))
    print(
        f"{args.size}x{args.size}: peak RSS above idle {result['peak_above_idle'] / 2**20:.1f} "
        f"MiB = {result['bytes_per_pixel']:.4f} bytes/pixel (target <= 0.25); "
        f"{result['section_s']:.0f} s, time per pixel {result['time_ratio']:.3f}x a "
        f"{result['reference_side']}x{result['reference_side']} image's (target <= 1.10; "
        f"CPU time {result['cpu_time_ratio']:.3f}x)"
    )


if __name__ == "__main__":
    main()
