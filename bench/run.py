"""One command for every benchmark, side by side in one run:

    .venv/bin/python -m bench.run [--quick] [--device auto|cpu|cuda]

Writes docs/benchmarks.md (tables + environment) and docs/bench/*.png. Figures that compare
two things are ratios measured in this run; spreads are (max - min) / median over repeats.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from bench import determinism, engine, liveness, load, outputs, peers, stack, workload
from bench.liveness import random_weights
from bench.load import LoadResult, Server
from unet_service.core.engine import DEFAULT_WEIGHTS, Segmenter
from unet_service.core.geometry import Geometry
from unet_service.core.precision import cpu_has_fast_bf16
from unet_service.core.tiling import choose_tile_size
from unet_service.core.tiling import tile_sizes as tile_buckets
from unet_service.core.weights import load_card
from unet_service.settings import Settings

TUTORIAL_CHANNELS = [3, 64, 128, 256, 512, 1024]
DOCS = workload.REPO / "docs"


class Report:
    """Markdown written as it is measured (and echoed, so a long run shows progress)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(fmt(v) for v in row) + " |")
        self.add()


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tutorial_weights(tmp: Path) -> Path:
    """The tutorial's channel list, randomly initialised (speed does not depend on values)."""
    return random_weights(tmp, "tutorial", TUTORIAL_CHANNELS, std=0.5)


@dataclass
class Run:
    """What one benchmark run measures, filled in section by section."""

    weights: Path
    device_name: str
    quick: bool
    tile_size: int
    precisions: list[str]
    repeats: int
    report: Report = field(default_factory=Report)
    peaks: dict[str, float] = field(default_factory=dict)
    best_engine: dict[tuple[str, str], engine.EngineResult] = field(default_factory=dict)
    ours: dict[tuple[str, int], LoadResult] = field(default_factory=dict)
    naive: dict[int, LoadResult] = field(default_factory=dict)
    batch_hist: dict[str, float] = field(default_factory=dict)

    @property
    def levels(self) -> list[int]:
        return [1, 8] if self.quick else [1, 4, 8, 32]

    @property
    def per_client(self) -> int:
        return 3 if self.quick else 8

    def segmenter(self, weights: Path, precision: str = "fp32", backend: str = "auto"):
        return Segmenter.from_weights(weights, self.device_name, precision, backend)


def service_level(
    server: Server, uploads: list, clients: int, total: int
) -> tuple[LoadResult, float, dict[str, float]]:
    """Load at one concurrency, with the server's own batch statistics over the same span."""
    before = load.scrape(server.url)
    result = load.run_load(server.url, uploads, clients, total)
    after = load.scrape(server.url)
    passes = after.get("unet_batch_tiles_count", 0) - before.get("unet_batch_tiles_count", 0)
    tiles = after.get("unet_batch_tiles_sum", 0) - before.get("unet_batch_tiles_sum", 0)
    hist = {
        k: after[k] - before.get(k, 0) for k in after if k.startswith("unet_batch_tiles_bucket")
    }
    return result, tiles / passes if passes else float("nan"), hist


def section_environment(run: Run, device: torch.device) -> None:
    import onnxruntime

    card = load_card(run.weights)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    r = run.report
    r.add("## Environment")
    r.add()
    r.table(
        ["item", "value"],
        [
            ["device", f"{device}{gpu}"],
            ["CPU", f"{cpu_name()}, {torch.get_num_threads()} threads"],
            ["Python", platform.python_version()],
            ["torch / onnxruntime", f"{torch.__version__} / {onnxruntime.__version__}"],
            ["shipped model", f"{card.name}, channels {card.channels}"],
            ["service tile size (largest bucket)", run.tile_size],
        ],
    )


def section_engine(run: Run, device: torch.device, tmp: Path) -> None:
    run.peaks = {
        "fp32": engine.matmul_flops(device, torch.float32),
        "bf16": engine.matmul_flops(device, torch.bfloat16),
    }
    r = run.report
    r.add("## 1. Engine limit (in-process, no HTTP)")
    r.add()
    r.add(
        f"Matrix-multiply peak measured in this run: fp32 {run.peaks['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {run.peaks['bf16'] / 1e9:.0f} GFLOP/s. Rows: output megapixels/s at the tile "
        "size, and the model's FLOP/s as a fraction of the fp32 and of the same-precision peak."
    )
    r.add()
    models = [("shipped", run.weights)]
    if not run.quick or device.type == "cuda":
        models.append(("tutorial", tutorial_weights(tmp)))
    batches = [1, 4] if run.quick else [1, 2, 4, 8]
    rows = []
    for label, weights in models:
        for precision in run.precisions:
            backends = ["auto"]
            if precision == "fp32" and device.type == "cpu":
                backends.append("torch")  # the runner-up, to show why auto chose as it did
            for backend in backends:
                seg = run.segmenter(weights, precision, backend)
                results = engine.engine_throughput(seg, run.tile_size, batches, run.repeats)
                for e in results:
                    rows.append(
                        [
                            label,
                            e.backend,
                            e.precision,
                            e.tile_size,
                            e.batch,
                            e.output_mpix_s,
                            e.flop_s / run.peaks["fp32"],
                            e.flop_s / run.peaks.get(e.precision, run.peaks["fp32"]),
                            e.spread,
                        ]
                    )
                if backend == "auto":
                    best = max(results, key=lambda e: e.output_mpix_s)
                    run.best_engine[(label, precision)] = best
    r.table(
        [
            "model",
            "backend",
            "precision",
            "tile",
            "batch",
            "output MP/s",
            "FLOP/s / fp32 peak",
            "FLOP/s / same-precision peak",
            "spread",
        ],
        rows,
    )


def section_determinism(run: Run, device: torch.device) -> None:
    r = run.report
    r.add("## 5. Determinism and precision (engine, shipped model, 1024x1024 EM image)")
    r.add()
    image = workload.em_image(1024, 1024)[:, :, None]
    geometry = Geometry(load_card(run.weights).depth)
    tile = tile_buckets(geometry, run.tile_size)[-2]  # the middle bucket: 16 tiles here
    fp32 = run.segmenter(run.weights, "fp32")
    rows = []
    for precision in run.precisions:
        backends = ["auto", "torch"] if precision == "fp32" and device.type == "cpu" else ["auto"]
        for backend in backends:
            d = determinism.measure(
                run.segmenter(run.weights, precision, backend), fp32, image, tile
            )
            rows.append(
                [
                    d.backend,
                    d.precision,
                    d.batch_max_diff,
                    d.batch_mask_agreement,
                    d.tiled_max_diff,
                    d.tiled_mask_agreement,
                    d.fp32_mask_agreement,
                ]
            )
    r.add(
        f"Tiles of {tile}: a tile alone vs among 7 others (batch), and the stitched result vs "
        "one pass over the whole mirror-padded image (tiled); max abs difference of "
        "probabilities and fraction of mask pixels that agree; last column: mask agreement "
        "with the default fp32 engine."
    )
    r.add()
    r.table(
        [
            "backend",
            "precision",
            "batch max diff",
            "batch mask agreement",
            "tiled max diff",
            "tiled mask agreement",
            "agreement with fp32",
        ],
        rows,
    )


def section_service(run: Run, device: torch.device) -> None:
    r = run.report
    r.add("## 2. Service over HTTP (`unet-serve`), ISBI test slices (512x512)")
    r.add()
    isbi = workload.isbi_uploads()
    rows = []
    mixed_result = mixed_batch = single_s = None
    for precision in run.precisions:
        with load.unet_server(run.weights, {"UNET_PRECISION": precision}) as server:
            for c in run.levels:
                res, mean_batch, hist = service_level(server, isbi, c, max(4, c * run.per_client))
                run.ours[(precision, c)] = res
                if c == 8 and precision == "fp32":
                    run.batch_hist = hist
                engine_mp = run.best_engine[("shipped", precision)].output_mpix_s
                rows.append(
                    [
                        precision,
                        c,
                        res.requests,
                        res.errors,
                        res.mpix_s,
                        res.mpix_s / engine_mp,
                        res.percentile(50),
                        res.percentile(95),
                        res.percentile(99),
                        mean_batch,
                    ]
                )
            if precision == "fp32":
                mixed = workload.mixed_uploads()
                total = len(mixed) * (1 if run.quick else 2)
                mixed_result, mixed_batch, _ = service_level(server, mixed, 8, total)
                singles = [load.run_load(server.url, isbi[:1], 1, 1) for _ in range(run.repeats)]
                single_s = statistics.median(x.percentile(50) for x in singles)
    r.table(
        [
            "precision",
            "clients",
            "requests",
            "errors",
            "useful MP/s",
            "/ engine limit",
            "p50 s",
            "p95 s",
            "p99 s",
            "mean batch (tiles)",
        ],
        rows,
    )
    m = mixed_result
    sizes = ", ".join(f"{h}x{w}" for h, w in workload.MIXED_SIZES)
    r.add(
        f"Mixed sizes ({sizes}), 8 clients: {m.mpix_s:.3g} useful MP/s, p99 "
        f"{m.percentile(99):.3g} s, {m.errors} errors, mean batch {mixed_batch:.3g} tiles, "
        f"computed / useful output pixels = {m.computed_pixels / m.pixels:.3f}."
    )
    r.add()
    # End-to-end latency of one 512x512 request against the model time of its own tiles.
    seg = run.segmenter(run.weights)
    size = choose_tile_size(512, 512, tile_buckets(seg.geometry, run.tile_size), seg.geometry)
    n = len(seg.plan(512, 512, size))
    side = size + seg.geometry.shrink
    tiles = np.zeros((n, seg.card.in_channels, side, side), np.float32)
    model_s = statistics.median(engine.timed(lambda: seg.forward(tiles), device, run.repeats))
    r.add(
        f"One 512x512 request alone: end-to-end {single_s * 1000:.0f} ms against "
        f"{model_s * 1000:.0f} ms model time for its {n} tile(s) of {size}: "
        f"ratio {single_s / model_s:.2f}."
    )
    r.add()


def peer_levels(run: Run, server: Server, path: str = "/v1/segment") -> dict[int, LoadResult]:
    """A peer server under the same ISBI load as ours in section 2, at 8 (and 1) clients."""
    isbi = workload.isbi_uploads()
    return {
        c: load.run_load(server.url, isbi, c, max(4, c * run.per_client), path)
        for c in ([8] if run.quick else [1, 8])
    }


def peer_table(run: Run, peer: str, results: dict[int, LoadResult]) -> None:
    """Throughput and p99 of a peer beside ours (fp32) at the same concurrency."""
    rows = []
    for c, res in results.items():
        ours = run.ours[("fp32", c)]
        rows.append(
            [
                c,
                res.mpix_s,
                ours.mpix_s / res.mpix_s,
                res.percentile(99),
                ours.percentile(99),
                res.errors,
            ]
        )
    header = ["clients", f"{peer} MP/s", f"ours / {peer}", f"{peer} p99 s", "ours p99 s"]
    run.report.table([*header, f"{peer} errors"], rows)


def section_peers(run: Run) -> None:
    r = run.report
    r.add("## 3. Peers: same model, same machine")
    r.add()
    with load.naive_server(run.weights) as server:
        run.naive = peer_levels(run, server)
    r.add(
        "(a) The naive FastAPI server (whole padded image per request, eager PyTorch, no "
        "batching), fp32, ISBI test slices:"
    )
    r.add()
    peer_table(run, "naive", run.naive)
    seg = run.segmenter(run.weights)
    image = workload.em_image(2048, 2048)[:, :, None]
    pr = peers.monai_vs_ours(seg, image, run.tile_size, batch=4)
    r.add(
        "(b) MONAI `sliding_window_inference` (overlap 0.25, gaussian blending) driving the "
        "same network through a mirror-pad wrapper, on one 2048x2048 EM image, fp32, batch 4. "
        "'exact' is one forward pass over the whole mirror-padded image:"
    )
    r.add()
    r.table(
        ["", "seconds", "max abs diff from exact", "mask pixels differing from exact"],
        [
            ["ours (overlap-tile)", pr.ours_s, pr.ours_max_diff, 0.0],
            ["MONAI", pr.monai_s, pr.monai_max_diff, pr.monai_mask_disagreement],
            ["MONAI time / ours", pr.monai_s / pr.ours_s, "", ""],
        ],
    )
    section_torchserve(run)


def section_torchserve(run: Run) -> None:
    r = run.report
    why_not = load.torchserve_available()
    if why_not is not None:
        r.add(f"(c) TorchServe: not measured: {why_not}.")
        r.add()
        return
    path = "/predictions/unet"
    with tempfile.TemporaryDirectory() as tmp, load.torchserve_server(run.weights, Path(tmp)) as ts:
        load.run_load(ts.url, workload.isbi_uploads()[:1], 1, 2, path=path)  # loaded, warm
        results = peer_levels(run, ts, path)
    r.add(
        "(c) TorchServe 0.12 (its last release; the project is archived) with "
        "`bench/torchserve_handler.py`: the same weights in eager PyTorch, one worker, its "
        "request batching at batch size 8 and 10 ms delay; same-size images in a batch are "
        "stacked into one forward pass over the mirror-padded images. fp32, ISBI test slices:"
    )
    r.add()
    peer_table(run, "TorchServe", results)


def section_scaling(run: Run) -> None:
    r = run.report
    r.add("## 4. Scaling with image size (service, mask output, one request at a time)")
    r.add()
    sizes = [512, 1024, 2048, 4096] if run.quick else [512, 1024, 2048, 4096, 8192]
    rows = []
    with load.unet_server(run.weights) as server:
        # Warm up with full batches first: the runtime keeps the memory of its largest batch
        # (ONNX Runtime's arena), which is a one-off cost, not a per-pixel one.
        warm = workload.Upload(
            "warm", 2048, 2048, workload.png_bytes(workload.em_image(2048, 2048))
        )
        load.run_load(server.url, [warm], 1, 1)
        for s in sizes:
            up = workload.Upload(f"{s}", s, s, workload.png_bytes(workload.em_image(s, s)))
            idle = server.rss_bytes()
            server.reset_peak_rss()
            res = load.run_load(server.url, [up], 1, 1)
            peak = server.rss_bytes("VmHWM")
            rows.append(
                [
                    f"{s}x{s}",
                    res.percentile(50),
                    res.percentile(50) / up.pixels * 1e6,
                    (peak - idle) / up.pixels,
                    len(up.png) / up.pixels,
                    res.errors,
                ]
            )
    r.table(
        [
            "image",
            "seconds",
            "microseconds / pixel",
            "peak RSS above idle, bytes / pixel",
            "upload PNG bytes / pixel",
            "errors",
        ],
        rows,
    )


def add_module_section(run: Run, title: str, module: ModuleType, lines: list[str]) -> None:
    """A section from a benchmark module: its title, its docstring's first paragraph and
    the Markdown lines its measurement produced."""
    run.report.add(f"## {title}")
    run.report.add()
    run.report.add(module.__doc__.split("\n\n")[0].replace("\n", " "))
    run.report.add()
    for line in lines:
        run.report.add(line)
    run.report.add()


def section_liveness(run: Run) -> None:
    rows = liveness.markdown(liveness.measure(run.quick))
    add_module_section(run, "Liveness under the largest requests", liveness, rows)


def section_outputs(run: Run) -> None:
    rows = outputs.markdown(outputs.measure(3 if run.quick else 7, run.weights))
    add_module_section(run, "What cell instances and test-time augmentation cost", outputs, rows)


def section_stack(run: Run) -> None:
    rows = stack.markdown(stack.measure(2 if run.quick else 5, run.weights))
    add_module_section(run, "A stack, synchronously", stack, rows)


def write_plots(run: Run, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)

    def throughput(ax) -> None:
        for precision in run.precisions:
            ys = [run.ours[(precision, c)].mpix_s for c in run.levels]
            ax.plot(run.levels, ys, "o-", label=f"unet-serve {precision}")
        naive = sorted(run.naive)
        ax.plot(naive, [run.naive[c].mpix_s for c in naive], "s--", label="naive server fp32")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrent clients", ylabel="useful output MP/s")
        ax.legend()

    def latency(ax) -> None:
        for q in (50, 95, 99):
            ys = [run.ours[("fp32", c)].percentile(q) for c in run.levels]
            ax.plot(run.levels, ys, "o-", label=f"p{q}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrent clients", ylabel="latency, s (fp32, 512x512)")
        ax.legend()

    def histogram(ax) -> None:
        def upper(key: str) -> float:
            return float(key.split('le="')[1].split('"')[0])

        keys = sorted(run.batch_hist, key=upper)
        cumulative = [run.batch_hist[k] for k in keys]
        counts = np.diff([0.0, *cumulative])
        labels = [key.split('le="')[1].split('"')[0] for key in keys]
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)), labels)
        ax.set(xlabel="tiles per forward pass (bucket upper edge)", ylabel="forward passes")

    figure("throughput.png", throughput)
    figure("latency.png", latency)
    figure("batch_sizes.png", histogram)
    run.report.add("![throughput](bench/throughput.png)")
    run.report.add("![latency](bench/latency.png)")
    run.report.add("![batch sizes at 8 clients, fp32](bench/batch_sizes.png)")
    run.report.add()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about 2 minutes on a 2-core CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--out", type=Path, default=DOCS / "benchmarks.md")
    args = p.parse_args(argv)
    if not args.weights.is_file():
        p.exit(2, f"bench: error: weights {args.weights} not found\n")
    started = time.perf_counter()
    device = Segmenter.from_weights(args.weights, device=args.device).device
    precisions = ["fp32"]
    if device.type == "cuda" or cpu_has_fast_bf16():
        precisions.append("bf16")
    run = Run(
        weights=args.weights,
        device_name=args.device,
        quick=args.quick,
        tile_size=Settings(weights=args.weights).tile_size,
        precisions=precisions,
        repeats=3 if args.quick else 7,
    )
    r = run.report
    r.add("# Benchmarks")
    r.add()
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    r.add(f"Generated by `{command}` on {datetime.date.today()}. Every ratio compares two")
    r.add("things measured in this same run on this machine; shared machines are noisy.")
    r.add()
    section_environment(run, device)
    with tempfile.TemporaryDirectory() as tmp:
        section_engine(run, device, Path(tmp))
    section_service(run, device)
    section_peers(run)
    section_scaling(run)
    section_determinism(run, device)
    section_liveness(run)
    section_outputs(run)
    section_stack(run)
    out_dir = args.out.parent / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(run, out_dir)
    r.add(f"Total benchmark time: {time.perf_counter() - started:.0f} s.")
    args.out.write_text("\n".join(r.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
