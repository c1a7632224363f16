"""Labelled image folders for training and evaluation: DIR/image/NAME.ext paired by file stem
with DIR/label/NAME.ext, as the ISBI 2012 data ships (label 255 = cell interior, 0 = membrane)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet_service.imaging.decode import read_image
from unet_service.imaging.errors import ImageError

# CI clones the repository with ../shared beside it, so the data is found relative to the repo.
REPO_ROOT = Path(__file__).resolve().parents[2]
ISBI_ROOT = REPO_ROOT.parent / "shared" / "data" / "isbi2012"
DEFAULT_DATA = ISBI_ROOT / "train"
DEFAULT_VALIDATION = (20, 21, 22, 23)

_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


class DataError(ValueError):
    """A data folder that is missing, unpaired or unreadable."""


@dataclass(frozen=True)
class Pair:
    name: str
    image: np.ndarray  # (H, W, C) in its own dtype
    label: np.ndarray  # (H, W) uint8, 1 = foreground (cell interior), 0 = background


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"folder {folder} not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in _SUFFIXES}


def load_pairs(data: str | Path) -> list[Pair]:
    """All image/label pairs of `data`, sorted by name. Labels are binarised at half their
    range, so 0/255 and 0/1 label images both work."""
    data = Path(data)
    images, labels = _images(data / "image"), _images(data / "label")
    if not images:
        raise DataError(f"no images in {data / 'image'}")
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise DataError(f"images and labels in {data} do not pair up: {', '.join(unpaired[:5])}")
    pairs = []
    for name in sorted(images):
        try:
            image = read_image(str(images[name]))
            label = read_image(str(labels[name]))
        except (ImageError, OSError) as e:
            raise DataError(f"{name}: {e}") from None
        if image.shape[:2] != label.shape[:2]:
            raise DataError(
                f"{name}: image is {image.shape[1]}x{image.shape[0]}, "
                f"label is {label.shape[1]}x{label.shape[0]}"
            )
        top = 1.0 if label.dtype == np.float32 else float(np.iinfo(label.dtype).max)
        binary = (label[:, :, 0] > top / 2).astype(np.uint8) if label.max() > 1 else label[..., 0]
        pairs.append(Pair(name, image, binary.astype(np.uint8)))
    return pairs


def parse_slices(text: str, count: int) -> list[int]:
    """'20,21,22,23' or '20-23' (indices into the sorted pairs) -> sorted unique indices."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise DataError(f"bad slice list {text!r}: use e.g. 20,21,22,23 or 20-23") from None
    bad = sorted(i for i in out if not 0 <= i < count)
    if bad or not out:
        raise DataError(f"slices {bad or text!r} out of range: there are {count} slices (0-based)")
    return sorted(out)
