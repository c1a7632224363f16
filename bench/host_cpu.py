"""Host CPU time per request, with a near-free model: what the service itself costs around the
network (HTTP, decoding, planning, cutting and normalising tiles, stitching, encoding), the
part that bounds throughput once a GPU makes the network cheap.

    .venv/bin/python -m bench.host_cpu [--serve OTHER_VENV/bin/unet-serve ...] [--requests N]

A randomly initialised UNet of channels [1, 2, 4, 8, 16, 32] (the shipped depth, almost no
arithmetic) serves N sequential 512x512 ISBI mask requests; the server process's user +
system CPU time over them (from /proc), divided by N, is the figure. Each `unet-serve` given
(this venv's by default, then the others: e.g. an earlier checkout's) is measured in turn,
`--rounds` times, alternating, so that the machine's drift hits them alike; medians are shown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.liveness import random_weights
from bench.load import Server, free_port
from bench.workload import isbi_uploads

CHANNELS = [1, 2, 4, 8, 16, 32]
WARM_UP = 10


def measure(exe: Path, weights: Path, body: bytes, requests: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per request of the server `exe`."""
    port = free_port()
    env = {
        "UNET_WEIGHTS": str(weights),
        "UNET_PORT": str(port),
        "UNET_HOST": "127.0.0.1",
        "UNET_LOG_LEVEL": "warning",
    }
    with (
        Server([str(exe)], env, port, "/v2/health/ready") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):

        def one() -> None:
            r = client.post("/v1/segment", files={"file": ("slice.png", body, "image/png")})
            r.raise_for_status()

        for _ in range(WARM_UP):
            one()
        cpu, wall = server.cpu_seconds(), time.perf_counter()
        for _ in range(requests):
            one()
        cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    return 1000 * cpu / requests, 1000 * wall / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_cpu", description=__doc__)
    p.add_argument("--serve", type=Path, action="append", default=[], help="another unet-serve")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    servers = [Path(sys.executable).parent / "unet-serve", *args.serve]
    body = isbi_uploads()[0].png
    results: dict[Path, list[tuple[float, float]]] = {exe: [] for exe in servers}
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_weights(Path(tmp), "nearfree", CHANNELS)
        for round_ in range(args.rounds):
            # Each round in the other order, so that a drift of the machine within a round
            # does not always favour the same server.
            for exe in servers if round_ % 2 == 0 else servers[::-1]:
                results[exe].append(measure(exe, weights, body, args.requests))
    first = results[servers[0]]
    print(
        "| unet-serve | host CPU ms / request | wall ms / request | CPU / the first's, per round |"
    )
    print("| --- | --- | --- | --- |")
    for exe, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        wall = statistics.median(r[1] for r in rows)
        ratios = [r[0] / f[0] for r, f in zip(rows, first, strict=True)]
        shown = ", ".join(f"{x:.3f}" for x in ratios)
        print(
            f"| {exe} | {cpu:.2f} | {wall:.2f} | median {statistics.median(ratios):.3f} ({shown}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
