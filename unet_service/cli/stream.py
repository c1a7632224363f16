"""`unet-predict`'s streaming path: a TIFF too large to decode (or any image with `--stream`)
is read by window and its result written as a tiled, compressed TIFF, in flat memory
(pipeline.section)."""

from __future__ import annotations

import sys
from pathlib import Path

import tifffile
from tqdm import tqdm

from unet_service.core.engine import Segmenter
from unet_service.imaging.decode import TIFF_MAGIC
from unet_service.imaging.errors import ImageError
from unet_service.imaging.sources import open_source
from unet_service.pipeline.section import Output, Progress, run_section

# Beyond this many pixels in one page a TIFF is streamed: the service's default
# UNET_MAX_PIXELS, about 1 GB of mask and probabilities in memory.
MAX_IN_MEMORY_PIXELS = 100_000_000
# What the streaming path accepts: a 100,000 x 100,000 section, or a stack of that many pixels.
MAX_STREAM_PIXELS = 10**10
MAX_STREAM_PAGES = 100_000


def wants_stream(path: Path, forced: bool) -> bool:
    """Whether `path` goes the streaming way: asked for, or a TIFF whose first page is too
    large to decode (its header says so; a broken one is left to the ordinary path)."""
    if forced:
        return True
    try:
        with open(path, "rb") as f:
            if f.read(4) not in TIFF_MAGIC:
                return False
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return page.imagelength * page.imagewidth > MAX_IN_MEMORY_PIXELS
    except Exception:
        return False


def stream_result_path(output_dir: Path, stem: str, output: Output) -> Path:
    return output_dir / (f"{stem}.tif" if output == "mask" else f"{stem}.probabilities.tif")


def predict_section(
    seg: Segmenter,
    path: Path,
    output_dir: Path,
    *,
    output: Output,
    tile_size: int,
    batch_size: int,
) -> Path:
    """Segment every page of `path` into DIR/<stem>.tif (mask: 0/255 for one class, the class
    index for several) or DIR/<stem>.probabilities.tif (float32, one sample per class). The
    file is written under a temporary name and renamed when complete."""
    target = stream_result_path(output_dir, path.stem, output)
    if target.exists() and target.samefile(path):
        raise ImageError(f"the result {target} would overwrite the input; choose another -o")
    partial = target.with_name(f".{target.name}.part")
    with (
        open_source(path, max_pixels=MAX_STREAM_PIXELS, max_pages=MAX_STREAM_PAGES) as source,
        tqdm(unit="tile", leave=False, file=sys.stderr) as bar,
    ):

        def progress(p: Progress) -> None:
            bar.total = p.tiles_total
            bar.update(p.tiles_done - bar.n)

        run_section(
            seg,
            source,
            partial,
            output=output,
            tile_sizes=tile_size,
            batch_size=batch_size,
            on_progress=progress,
        )
    partial.replace(target)
    return target
