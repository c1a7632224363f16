"""Two models served at once: each model's throughput under mixed load against its throughput
alone, side by side in one run of one server.

    .venv/bin/python -m bench.two_models [--seconds 60] [--second WEIGHTS.safetensors]

One `unet-serve` process serves a repository of two models: the shipped weights as `a`, and
as `b` the same weights again (or `--second`: any other of our models). Closed-loop clients
post 512x512 ISBI slices to /v1/segment?model=NAME for a fixed window, in four phases:
`a` alone, `b` alone, both with the same load (2 clients each), and a flood for `a`
(4 clients) beside one client of `b`. The worker serves the models that have work in turn,
so under equal load each should keep about half of its rate alone, and a flood for one
must not push the other much below that. Tiles/s come from the server's own
`unet_tiles_total{model}`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import scrape, unet_server
from bench.workload import REPO, isbi_uploads

PHASES: list[tuple[str, dict[str, int]]] = [
    ("a alone", {"a": 2}),
    ("b alone", {"b": 2}),
    ("a + b, equal load", {"a": 2, "b": 2}),
    ("a flooded, b beside it", {"a": 4, "b": 1}),
]


async def closed_loop(url: str, clients: dict[str, int], seconds: float) -> dict[str, int]:
    """Requests completed per model in the window (each client sends its next upload as soon
    as the last one returned; requests still running at the end are not counted)."""
    uploads = isbi_uploads()
    done = dict.fromkeys(clients, 0)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=sum(clients.values()))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(model: str, seed: int) -> None:
            i = seed
            while time.perf_counter() < deadline:
                upload = uploads[i % len(uploads)]
                files = {"file": (f"{upload.name}.png", upload.png, "image/png")}
                r = await client.post(f"/v1/segment?model={model}", files=files)
                r.raise_for_status()
                if time.perf_counter() <= deadline:
                    done[model] += 1
                i += 1

        await asyncio.gather(
            *(worker(m, k) for m, n in clients.items() for k in range(n)),
        )
    return done


def tiles(url: str) -> dict[str, float]:
    metrics = scrape(url)
    return {m: metrics.get(f'unet_tiles_total{{model="{m}"}}', 0.0) for m in ("a", "b")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--second", type=Path, help="model b (default: the shipped weights)")
    args = parser.parse_args(argv)

    shipped = REPO / "weights" / "isbi2012.safetensors"
    second = args.second or shipped
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name, weights in (("a", shipped), ("b", second)):
            shutil.copy(weights, repo / f"{name}.safetensors")
            shutil.copy(weights.with_suffix(".json"), repo / f"{name}.json")
        env = {"UNET_MODELS": str(repo), "UNET_DEFAULT_MODEL": "a"}
        with unet_server(shipped, env) as server:
            # Load b and run both once, so that no phase pays for loading or first passes.
            httpx.post(f"{server.url}/v2/repository/models/b/load", timeout=600).raise_for_status()
            asyncio.run(closed_loop(server.url, {"a": 1, "b": 1}, 1.0))
            rows = []
            for phase, clients in PHASES:
                before, start = tiles(server.url), time.perf_counter()
                done = asyncio.run(closed_loop(server.url, clients, args.seconds))
                wall = time.perf_counter() - start
                after = tiles(server.url)
                rates = {
                    m: (done[m] / args.seconds, (after[m] - before[m]) / wall) for m in clients
                }
                rows.append((phase, clients, rates))
                print(f"  {phase}: {done}", flush=True)

    alone = {m: rows[i][2][m] for i, m in enumerate(("a", "b"))}
    print(f"\nTwo models in one server, {args.seconds:.0f} s per phase, 512x512 ISBI slices")
    print(f"(b = {'the shipped weights again' if args.second is None else second.name})\n")
    print("| phase | clients | model | requests/s | tiles/s | of its rate alone |")
    print("|---|---|---|---:|---:|---:|")
    for phase, clients, rates in rows:
        for m, (rps, tps) in rates.items():
            share = rps / alone[m][0] if alone[m][0] else float("nan")
            print(f"| {phase} | {clients[m]} | {m} | {rps:.2f} | {tps:.1f} | {share:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
