"""`unet-predict VOLUME.zarr -o DIR`: an OME-Zarr image segmented block by block into
DIR/VOLUME.zarr (the mask, an NGFF labels image), DIR/VOLUME.probabilities.zarr and
DIR/VOLUME.instances.zarr: `pipeline.to_store`, as a job's OME-Zarr result, with the blocks
computed in this process or, with `--scheduler ADDRESS`, on that Dask cluster's workers
(`serving.cluster`). A run stopped part-way is resumed by the same command: the blocks its
stores record as written are not computed again."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from unet_service.core.engine import TiledModel
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.errors import ImageError
from unet_service.imaging.sources import open_zarr
from unet_service.imaging.zarr_result import ZarrResult
from unet_service.locations import DEFAULT_ZARR_BLOCK
from unet_service.pipeline.blocks import BlockJob
from unet_service.pipeline.outputs import Output
from unet_service.pipeline.to_file import Progress
from unet_service.pipeline.to_store import (
    BlockCounts,
    create_results,
    plan_volume,
    segment_to_store,
    volume_of,
)

# What the command line accepts: a volume of 10^12 pixels (local data is the user's to spend).
MAX_VOLUME_PIXELS = 10**12
MAX_VOLUME_PAGES = 10**6


def is_zarr(path: Path) -> bool:
    """Whether `path` is a Zarr store (a folder with Zarr v2 or v3 metadata, or named .zarr)."""
    if path.suffix == ".zarr":
        return True
    return path.is_dir() and any((path / n).exists() for n in ("zarr.json", ".zgroup", ".zattrs"))


def result_locations(
    path: Path, output_dir: Path, outputs: tuple[Output, ...]
) -> dict[Output, str]:
    name = path.name.removesuffix(".zarr")
    infix = {"mask": "", "probabilities": ".probabilities", "instances": ".instances"}
    # Absolute: a cluster's workers run elsewhere than this command.
    return {o: str(output_dir.resolve() / f"{name}{infix[o]}.zarr") for o in outputs}


def _existing(locations: dict[Output, str], input_name: str) -> dict[Output, ZarrResult] | None:
    """The stores an earlier, unfinished run of this volume left (to resume), or None when
    there are none; ImageError when a target holds anything else."""
    found = {o: Path(where).exists() for o, where in locations.items()}
    if not any(found.values()):
        return None
    results = {}
    for output, where in locations.items():
        result = ZarrResult.open(where) if found[output] else None
        if result is None or result.info.get("input") != input_name:
            raise ImageError(f"{where} exists and is not an unfinished result of {input_name}")
        if result.info.get("complete"):
            raise ImageError(f"{where} exists (a finished result); choose another -o")
        results[output] = result
    return results


def model_names(seg: TiledModel, weights: Path) -> tuple[str, list[str]]:
    """The model's name and class names: its card's, or for a bioimage.io package (which has
    none of ours) its file's name and numbered classes."""
    card = getattr(seg, "card", None)
    if card is not None:
        return card.name, list(card.class_names)
    return weights.stem, [f"class {k}" for k in range(seg.out_channels)]


def predict_volume(
    seg: TiledModel,
    weights: Path,
    path: Path,
    output_dir: Path,
    *,
    outputs: tuple[Output, ...],
    tile_size: int,
    batch_size: int,
    block: int = DEFAULT_ZARR_BLOCK,
    scheduler: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> BlockCounts:
    """Segment the OME-Zarr image at `path` into one result store per output under
    `output_dir`; returns the blocks (those written by an earlier run skipped)."""
    locations = result_locations(path, output_dir, outputs)
    input_name = str(path.resolve())
    source = open_zarr(input_name, max_pixels=MAX_VOLUME_PIXELS, max_pages=MAX_VOLUME_PAGES)
    with source:
        recipe = seg.recipe(tile_size)
        results = _existing(locations, input_name)
        if results is None:
            volume = plan_volume(source, recipe, outputs, block)
            name, classes = model_names(seg, weights)
            info = {
                "input": input_name,
                "model": name,
                "card": {"name": name, "threshold": seg.threshold, "classes": classes},
                "settings": {"tile_size": volume.tile_size, "block": list(volume.block)},
            }
            results = create_results(locations, source, recipe, volume, info)
        volume = volume_of(next(iter(results.values())))
        tag = int(max(r.block_tags().max(initial=0) for r in results.values())) + 1
        labeller = seg.instances if "instances" in outputs else None
        job = BlockJob(volume, source, seg.recipe(volume.tile_size), results, labeller, tag=tag)
        runner = None
        if scheduler:
            from unet_service.serving.cluster import BlockTask, ModelSpec, on_cluster

            model = ModelSpec(
                str(weights.resolve()),
                device=device,
                precision=precision,
                batch_cpu=batch_size,
                batch_cuda=batch_size,
            )
            task = BlockTask(
                f"cli-{uuid.uuid4().hex}",
                input_name,
                True,
                dict(locations),
                model,
                labeller is not None,
                tag,
            )
            runner = on_cluster(scheduler, task)
        run = BatchRunner(seg, batch_size)

        async def compute(entry):
            def tiles():
                run_tiles(entry, run)
                return entry.result()

            return await asyncio.to_thread(tiles)

        total = volume.total_tiles(recipe.geometry)
        with tqdm(total=total, unit="tile", leave=False, file=sys.stderr) as bar:
            progress = Progress(tiles_total=total, pages_total=source.pages)
            progress.on_page = lambda p: bar.update(p.tiles_done - bar.n)
            work = segment_to_store(
                job,
                compute=compute,
                runner=runner,
                progress=progress,
                name=path.name.removesuffix(".zarr"),
                class_names=model_names(seg, weights)[1],
            )
            return asyncio.run(work)
