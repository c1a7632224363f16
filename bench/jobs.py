"""Section jobs through the HTTP API of a real `unet-serve` process, on the shipped weights:

1. a whole section: a SIDE x SIDE 8-bit tiled TIFF (20,000 a side by default) as a job.
   Peak resident memory of the server above its idle level, per input pixel (target <= 0.25
   bytes), and its time per pixel against a 2048x2048 `/v1/segment` request on the same
   server (target: within 10 %).
2. interactive requests during a job: 512x512 `/v1/segment` latency while the server is idle
   and while a big job runs (target: median within 2x of idle).

`python -m bench.jobs` prints a Markdown table (`--side 8000` for a quicker run). The input
is written tile by tile from ISBI slices, so making it needs no memory either.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

from bench.load import unet_server
from unet_service.options import DEFAULT_WEIGHTS
from unet_service.training.data import DEFAULT_DATA

TIFF_TILE = 512
TARGET_BYTES_PER_PIXEL = 0.25
TARGET_TIME_RATIO = 1.10
TARGET_LATENCY_RATIO = 2.0


def isbi_tiles() -> list[np.ndarray]:
    folder = Path(DEFAULT_DATA) / "image"
    slices = [np.asarray(Image.open(folder / f"{i:02d}.png")) for i in range(4)]
    return [np.ascontiguousarray(v) for s in slices for v in (s, s[::-1], s[:, ::-1])]


def write_section(path: Path, side: int) -> None:
    """A side x side 8-bit tiled, Deflate-compressed TIFF of EM tiles (BigTIFF: a large one
    passes 4 GB of offsets' range quickly), written one tile at a time."""
    sources = isbi_tiles()
    n = -(-side // TIFF_TILE)

    def tiles():
        for ty in range(n):
            for tx in range(n):
                yield sources[(ty * 7 + tx * 3) % len(sources)][:TIFF_TILE, :TIFF_TILE]

    tifffile.imwrite(
        path,
        data=tiles(),
        shape=(side, side),
        dtype=np.uint8,
        tile=(TIFF_TILE, TIFF_TILE),
        compression="zlib",
        bigtiff=True,
    )


def crop(side: int) -> bytes:
    path = Path(tempfile.mkstemp(suffix=".tif")[1])
    try:
        base = np.tile(isbi_tiles()[0], (-(-side // 512), -(-side // 512)))[:side, :side]
        tifffile.imwrite(path, base)
        return path.read_bytes()
    finally:
        path.unlink()


def segment_s(client: httpx.Client, body: bytes) -> float:
    start = time.perf_counter()
    r = client.post("/v1/segment", content=body, headers={"Content-Type": "image/tiff"})
    r.raise_for_status()
    return time.perf_counter() - start


def run_job(client: httpx.Client, path: Path) -> tuple[float, dict]:
    """Submit, wait; seconds from the job's start to done (upload excluded)."""
    with open(path, "rb") as f:
        r = client.post("/v1/jobs", content=f, headers={"Content-Type": "image/tiff"})
    r.raise_for_status()
    job = r.json()
    started = None
    while job["state"] in ("queued", "running"):
        if started is None and job["state"] == "running":
            started = time.perf_counter()
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    if job["state"] != "done":
        raise RuntimeError(f"job ended {job['state']}: {job['error']}")
    return time.perf_counter() - (started or time.perf_counter()), job


def measure(side: int, weights: Path, repeats: int) -> list[tuple[str, str, str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        section = Path(tmp) / "section.tif"
        write_section(section, side)
        env = {"UNET_JOBS_DIR": str(Path(tmp) / "jobs"), "UNET_JOB_PROGRESS_S": "0.5"}
        with (
            unet_server(weights, env) as server,
            httpx.Client(base_url=server.url, timeout=3600) as client,
        ):
            small, medium = crop(512), crop(2048)
            segment_s(client, small)  # first request: buffers, kernels
            idle_rss = server.rss_bytes()
            server.reset_peak_rss()
            # The job first: memory that a big request allocated stays with the process
            # (the allocator keeps it), which would hide what the job itself needs.
            cpu = server.cpu_seconds()
            job_s, job = run_job(client, section)
            job_cpu = server.cpu_seconds() - cpu
            peak = server.rss_bytes("VmHWM") - idle_rss
            server.reset_peak_rss()
            cpu = server.cpu_seconds()
            request_s = [segment_s(client, medium) for _ in range(repeats)]
            request_cpu = (server.cpu_seconds() - cpu) / repeats
            peak_request = server.rss_bytes("VmHWM") - idle_rss
            latency = interactive_latency(server.url, client, section, repeats * 4)
    pixels = side * side
    per_pixel = peak / pixels
    request = statistics.median(request_s)
    ratio = (job_s / pixels) / (request / 2048**2)
    # On a shared machine wall time also measures the neighbours; the server's CPU time
    # per pixel does not.
    cpu_ratio = (job_cpu / pixels) / (request_cpu / 2048**2)
    idle, busy = latency
    idle_med, busy_med = statistics.median(idle), statistics.median(busy)
    latency_ratio = busy_med / idle_med
    return [
        (
            f"{side}x{side} job: peak RSS above the idle server",
            f"{peak / 2**20:.0f} MiB = {per_pixel:.3f} B/px (then a 2048x2048 request: "
            f"{peak_request / 2**20:.0f} MiB)",
            f"<= {TARGET_BYTES_PER_PIXEL} B/px",
            "met" if per_pixel <= TARGET_BYTES_PER_PIXEL else "missed",
        ),
        (
            f"{side}x{side} job: time per pixel / a 2048x2048 request's",
            f"{ratio:.3f} ({job_s:.0f} s, {job['progress']['tiles_total']} tiles; request "
            f"{request:.2f} s); CPU time {cpu_ratio:.3f} ({job_cpu:.0f} vs "
            f"{request_cpu:.2f} CPU s)",
            f"<= {TARGET_TIME_RATIO}",
            "met" if ratio <= TARGET_TIME_RATIO else "missed",
        ),
        (
            "512x512 request latency while a job runs / idle (median)",
            f"{latency_ratio:.2f} ({busy_med * 1000:.0f} vs {idle_med * 1000:.0f} ms; "
            f"worst {max(busy) * 1000:.0f} ms, n={len(busy)})",
            f"<= {TARGET_LATENCY_RATIO}",
            "met" if latency_ratio <= TARGET_LATENCY_RATIO else "missed",
        ),
    ]


def interactive_latency(
    url: str, client: httpx.Client, section: Path, samples: int
) -> tuple[list[float], list[float]]:
    """512x512 request latencies with the server idle, then while a job runs (the job is
    deleted once enough samples are taken)."""
    small = crop(512)
    idle = [segment_s(client, small) for _ in range(samples)]
    with open(section, "rb") as f:
        r = client.post("/v1/jobs", content=f, headers={"Content-Type": "image/tiff"})
    r.raise_for_status()
    job_id = r.json()["id"]
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["tiles_done"] == 0:
        time.sleep(0.1)
    busy = []
    for _ in range(samples):
        busy.append(segment_s(client, small))
        time.sleep(0.3)  # a user's pace: the job gets the device between requests
    client.delete(f"/v1/jobs/{job_id}")
    return idle, busy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=20_000)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = measure(args.side, args.weights, args.repeats)
    print("| measure | result | target | |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
