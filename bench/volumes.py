"""Whole volumes over Dask: an OME-Zarr stack of ISBI test slices segmented by `unet-predict
VOLUME.zarr --scheduler` (the same block code as a job's) on a local Dask cluster, shipped
model, CPU. Measured side by side in one run:

- throughput with one worker against two workers of one thread each (target >= 1.7x);
- computed / useful output pixels at the default block size (target <= 1.10), for this
  volume and for a 10 x 8192 x 8192 stack in 512-pixel chunks (from the block plan);
- each worker's peak memory (its process's max RSS) for the volume and a 4x larger one (target:
  the same within 10 %);
- the naive peer: `dask.array.map_overlap` calling the model on each chunk with the
  network's context as depth and `boundary="reflect"`, its mask pixels that differ from the
  whole-image result (seams) and its time, beside ours (ours: 0 by construction, checked).

`python -m bench.volumes [--quick]` prints a Markdown table."""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from distributed import Client, LocalCluster

from bench.workload import isbi_slices
from unet_service.cli.volume import predict_volume
from unet_service.core.engine import Segmenter
from unet_service.core.geometry import Geometry
from unet_service.imaging.zarr_source import zarr_store
from unet_service.locations import DEFAULT_ZARR_BLOCK
from unet_service.options import DEFAULT_WEIGHTS
from unet_service.pipeline.volume import Volume, block_shape

TILE = 516
CHUNK = 256
BLOCK = DEFAULT_ZARR_BLOCK  # a 512 x 512 slice a block


def write_volume(path: Path, pages: int) -> np.ndarray:
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    slices = isbi_slices()
    data = np.stack([slices[i % len(slices)] for i in range(pages)])
    group = zarr.open_group(zarr_store(str(path), read_only=False), mode="w", zarr_format=3)
    write_image(
        data,
        group,
        scale_factors=[],
        fmt=FormatV05(),
        axes="zyx",
        storage_options={"chunks": (1, CHUNK, CHUNK)},
    )
    return data


def peak_rss(dask_worker=None) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_s(dask_worker=None) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    seconds: float  # wall clock
    peak: int  # the largest worker's peak RSS, bytes
    cpu: list[float]  # each worker's CPU seconds in the timed run


def on_cluster(seg: Segmenter, source: Path, out: Path, workers: int, block: int) -> Run:
    """The volume on a fresh cluster of `workers` one-thread workers, timed after a first
    run (which loads the model on every worker)."""
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        options = {"outputs": ("mask",), "tile_size": TILE, "batch_size": 1, "block": block}
        options |= {"scheduler": cluster.scheduler_address, "device": "cpu"}
        predict_volume(seg, DEFAULT_WEIGHTS, source, out / "warm", **options)
        before = client.run(cpu_s)
        start = time.perf_counter()
        predict_volume(seg, DEFAULT_WEIGHTS, source, out, **options)
        elapsed = time.perf_counter() - start
        after = client.run(cpu_s)
        peak = max(client.run(peak_rss).values())
    return Run(elapsed, peak, [after[w] - before[w] for w in after])


def _spin(_: int = 0) -> float:
    start, total = time.perf_counter(), 0
    for i in range(20_000_000):
        total += i
    return time.perf_counter() - start


def machine_ceiling() -> float:
    """What two processes of plain CPU-bound Python get done here against one: the most any
    two workers can gain on this machine now (2.0 on two free cores)."""
    alone = _spin()
    with multiprocessing.Pool(2) as pool:
        together = pool.map(_spin, [0, 1])
    return 2 * alone / max(together)


def overhead(
    shape: tuple[int, int, int], chunks: tuple[int, int, int], geometry: Geometry
) -> float:
    """Output pixels computed (every tile of every block) over the volume's pixels."""
    block = block_shape(chunks, DEFAULT_ZARR_BLOCK, shape)
    volume = Volume(*shape, block, TILE)
    return volume.total_tiles(geometry) * TILE**2 / (shape[0] * shape[1] * shape[2])


def naive(seg: Segmenter, data: np.ndarray) -> tuple[float, np.ndarray]:
    margin = seg.geometry.margin

    def segment(block: np.ndarray) -> np.ndarray:
        return np.stack([seg.segment(p[:, :, None], TILE).mask for p in block])

    array = da.from_array(data, chunks=(1, CHUNK, CHUNK))
    lazy = array.map_overlap(
        segment, depth={0: 0, 1: margin, 2: margin}, boundary="reflect", dtype=np.uint8
    )
    start = time.perf_counter()
    mask = lazy.compute(scheduler="threads", num_workers=2)
    return time.perf_counter() - start, mask


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.volumes")
    p.add_argument("--quick", action="store_true", help="4 and 16 slices instead of 8 and 32")
    args = p.parse_args(argv)
    pages = 4 if args.quick else 8
    seg = Segmenter.from_weights(DEFAULT_WEIGHTS, device="cpu", backend="torch")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small, large = root / "small.zarr", root / "large.zarr"
        data = write_volume(small, pages)
        write_volume(large, 4 * pages)
        whole = np.stack([seg.segment(p[:, :, None], TILE).mask for p in data])
        ceiling = machine_ceiling()
        one = on_cluster(seg, small, root / "one", 1, BLOCK)
        two = on_cluster(seg, small, root / "two", 2, BLOCK)
        ceiling = min(ceiling, machine_ceiling())  # before and after: the lower
        large_run = on_cluster(seg, large, root / "large", 1, BLOCK)
        ours = np.asarray(zarr.open_array(str(root / "two" / "small.zarr"), path="0")[:])
        naive_s, naive_mask = naive(seg, data)
    shape = data.shape
    seams = naive_mask != whole
    rows = [
        (
            "two workers / one (throughput, wall clock)",
            f"{one.seconds / two.seconds:.2f}x",
            ">= 1.7x",
        ),
        (
            "two workers / one, from the workers' CPU time (on two free cores)",
            f"{sum(one.cpu) / max(two.cpu):.2f}x",
            ">= 1.7x",
        ),
        ("this machine now: two busy processes / one (the ceiling)", f"{ceiling:.2f}x", "2.0"),
        ("two workers' CPU seconds", " + ".join(f"{c:.2f}" for c in two.cpu), ""),
        (
            f"computed / useful, this volume {shape}",
            f"{overhead(shape, (1, CHUNK, CHUNK), seg.geometry):.3f}",
            "<= 1.10",
        ),
        (
            "computed / useful, 10 x 8192 x 8192, chunks 512",
            f"{overhead((10, 8192, 8192), (1, 512, 512), seg.geometry):.3f}",
            "<= 1.10",
        ),
        (
            f"worker peak RSS, {pages} vs {4 * pages} slices",
            f"{one.peak / 2**20:.0f} MiB vs {large_run.peak / 2**20:.0f} MiB "
            f"({large_run.peak / one.peak - 1:+.1%})",
            "within 10 %",
        ),
        ("ours: mask pixels differing from the whole image", f"{int((ours != whole).sum())}", "0"),
        ("ours, one worker / two workers (s)", f"{one.seconds:.2f} / {two.seconds:.2f}", ""),
        (
            "map_overlap reflect: mask pixels differing (seams)",
            f"{int(seams.sum())} ({seams.mean():.3%})",
            "",
        ),
        ("map_overlap reflect, 2 threads (s)", f"{naive_s:.2f}", ""),
    ]
    print(
        f"Volume {shape[0]} x {shape[1]} x {shape[2]} (ISBI test slices), chunks {CHUNK}, "
        f"tile {TILE}, default block ({BLOCK}), one-thread workers.\n"
    )
    print("| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
