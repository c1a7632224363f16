"""What the optional outputs cost, measured side by side in one run over HTTP on the shipped
model: one 512 x 512 ISBI slice as a mask, as cell instances, and as a mask with 8-way
test-time augmentation. Targets: instances add at most 20 % to the request time, tta=8
costs at most 8.5 times the plain request.

`python -m bench.outputs` prints a Markdown table; `bench.run` includes it as a section."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.load import unet_server
from unet_service.options import DEFAULT_WEIGHTS

SLICE = Path(__file__).resolve().parent.parent.parent / "shared/data/isbi2012/test/05.png"
VARIANTS = [
    ("mask", {"output": "mask"}),
    ("instances", {"output": "instances"}),
    ("mask, tta=8", {"output": "mask", "tta": 8}),
]


def measure(repeats: int, weights: Path = DEFAULT_WEIGHTS) -> list[list[object]]:
    data = SLICE.read_bytes()
    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    with unet_server(weights) as server, httpx.Client(base_url=server.url, timeout=300) as c:
        for _ in range(repeats + 1):  # the first round warms up, and is not counted
            for name, params in VARIANTS:
                start = time.perf_counter()
                r = c.post("/v1/segment", params=params, files={"file": ("s.png", data)})
                elapsed = time.perf_counter() - start
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                times[name].append(elapsed)
    base = statistics.median(times["mask"][1:])
    rows = []
    for name, _ in VARIANTS:
        median = statistics.median(times[name][1:])
        rows.append([name, median * 1000, median / base])
    return rows


def markdown(rows: list[list[object]]) -> list[str]:
    lines = ["| output | median ms | / mask |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.0f} | {ratio:.2f} |" for name, ms, ratio in rows]
    ratios = {name: ratio for name, _, ratio in rows}
    lines += [
        "",
        f"Instances add {100 * (ratios['instances'] - 1):.0f} % (target <= 20 %); tta=8 "
        f"costs {ratios['mask, tta=8']:.2f}x (target <= 8.5x).",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.outputs", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print("\n".join(markdown(measure(args.repeats))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
