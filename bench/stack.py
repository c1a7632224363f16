"""A stack, synchronously: the 30 ISBI test slices (512 x 512) as one multi-page TIFF in one
request, against the same 30 slices as 30 single-page PNG requests sent at once, over HTTP
to one server, mask output, shipped model. Target: the stack's throughput at least 0.9 of
the 30 requests'. The two are run alternately after a warm-up round, and the median of each
is compared; the stack's mask pages are checked against the single requests' masks.

`python -m bench.stack` prints a Markdown table; `bench.run` includes it as a section."""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

from bench.load import unet_server
from bench.workload import isbi_slices, png_bytes
from unet_service.options import DEFAULT_WEIGHTS

PAGES = 30
TARGET = 0.9


def stack_tiff(pages: list[np.ndarray]) -> bytes:
    """The slices as an uncompressed multi-page TIFF, as microscopes write stacks."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for page in pages:
            tif.write(page, photometric="minisblack", contiguous=False)
    return buf.getvalue()


async def _singles(client: httpx.AsyncClient, pngs: list[bytes]) -> tuple[float, list[bytes]]:
    start = time.perf_counter()
    replies = await asyncio.gather(
        *(
            client.post("/v1/segment", files={"file": (f"{i}.png", png)})
            for i, png in enumerate(pngs)
        )
    )
    elapsed = time.perf_counter() - start
    for r in replies:
        if r.status_code != 200:
            raise RuntimeError(f"single page: {r.status_code} {r.text[:200]}")
    return elapsed, [r.content for r in replies]


async def _stack(client: httpx.AsyncClient, data: bytes) -> tuple[float, bytes]:
    start = time.perf_counter()
    r = await client.post("/v1/segment", files={"file": ("stack.tif", data)})
    elapsed = time.perf_counter() - start
    if r.status_code != 200 or r.headers.get("x-pages") != str(PAGES):
        raise RuntimeError(f"stack: {r.status_code} {r.text[:200]}")
    return elapsed, r.content


async def _measure(url: str, repeats: int) -> dict[str, object]:
    slices = isbi_slices()[:PAGES]
    if len(slices) < PAGES:
        raise SystemExit(f"bench.stack: error: {PAGES} ISBI test slices needed")
    pngs = [png_bytes(s) for s in slices]
    data = stack_tiff(slices)
    stack_s, single_s = [], []
    limits = httpx.Limits(max_connections=PAGES)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for round_ in range(repeats + 1):  # the first round warms up and is not counted
            t_stack, stack_body = await _stack(client, data)
            t_single, single_bodies = await _singles(client, pngs)
            if round_:
                stack_s.append(t_stack)
                single_s.append(t_single)
    with tifffile.TiffFile(io.BytesIO(stack_body)) as tif:
        pages = [page.asarray() for page in tif.pages]
    alone = [np.asarray(Image.open(io.BytesIO(body))) for body in single_bodies]
    agree = float(np.mean([np.mean(p == a) for p, a in zip(pages, alone, strict=True)]))
    return {
        "stack_s": statistics.median(stack_s),
        "single_s": statistics.median(single_s),
        "stack_all": stack_s,
        "single_all": single_s,
        "agreement": agree,
        "upload_mb": len(data) / 2**20,
    }


def measure(repeats: int, weights: Path = DEFAULT_WEIGHTS) -> dict[str, object]:
    with unet_server(weights) as server:
        return asyncio.run(_measure(server.url, repeats))


def markdown(m: dict[str, object]) -> list[str]:
    stack_s, single_s = float(m["stack_s"]), float(m["single_s"])  # type: ignore[arg-type]
    ratio = single_s / stack_s  # throughput ratio: same pages, inverse times
    runs = ", ".join(
        f"{a:.2f}/{b:.2f}"
        for a, b in zip(m["stack_all"], m["single_all"], strict=True)  # type: ignore[call-overload]
    )
    return [
        "| how | median s | pages/s |",
        "|---|---|---|",
        f"| one request, {PAGES}-page TIFF ({m['upload_mb']:.1f} MiB) | {stack_s:.2f} | "
        f"{PAGES / stack_s:.2f} |",
        f"| {PAGES} single-page PNG requests at once | {single_s:.2f} | {PAGES / single_s:.2f} |",
        "",
        f"Stack / single requests throughput: {ratio:.2f} (target >= {TARGET}: "
        f"{'met' if ratio >= TARGET else 'missed'}). Each round, stack s / singles s: {runs}. "
        f"Mask pixels equal between the stack's pages and the single requests: "
        f"{100 * float(m['agreement']):.4f} %.",  # type: ignore[arg-type]
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.stack", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)
    print("\n".join(markdown(measure(args.repeats, args.weights))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
