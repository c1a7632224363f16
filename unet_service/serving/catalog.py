"""What a model repository folder (`UNET_MODELS`) holds and what is shown of each model, read
from its files without loading it. A model is `NAME.safetensors` with its card `NAME.json`
(our U-Net), or a bioimage.io package: `NAME.zip`, or a folder `NAME/` holding `rdf.yaml` or
`bioimageio.yaml` (`zoo.package`); a package the service cannot serve is listed with the
reason (`refusal`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_service.core.engine import Segmenter, TiledModel
from unet_service.core.geometry import Geometry
from unet_service.core.tiling import tile_sizes
from unet_service.core.weights import ModelCard, load_card
from unet_service.settings import Settings
from unet_service.zoo.package import Package, PackageError, is_package, read_package
from unet_service.zoo.segmenter import MAX_MEASURED_PIXELS, PackageSegmenter


@dataclass(frozen=True)
class ModelInfo:
    """What the routes show of a model (from its card, or its package) and of how it is
    served."""

    name: str
    description: str
    class_names: list[str]
    threshold: float
    depth: int | None  # our U-Net's; None for a bioimage.io package
    in_channels: int
    out_channels: int
    tile_sizes: tuple[int, ...]
    # The card's headline validation figures, each defined (core.card_metrics); {} if none.
    metrics: dict[str, dict[str, Any]]
    platform: str = "pytorch"  # "bioimageio" for a package


def model_info(name: str, card: ModelCard, settings: Settings) -> ModelInfo:
    """What is shown of model `name` (its card), served with the service's tile sizes."""
    return ModelInfo(
        name=name,
        description=card.description,
        class_names=list(card.class_names),
        threshold=card.threshold,
        depth=card.depth,
        in_channels=card.in_channels,
        out_channels=card.out_channels,
        tile_sizes=tile_sizes(Geometry(card.depth), settings.tile_size),
        metrics=card.metrics_summary(),
    )


def package_info(name: str, package: Package, settings: Settings) -> ModelInfo:
    """What is shown of a bioimage.io package served as `name`: its description and output
    channels, its tile sizes (the largest legal one within UNET_TILE_SIZE, and smaller)."""
    return ModelInfo(
        name=name,
        description=package.description or package.title,
        class_names=package.class_names,
        threshold=package.threshold,
        depth=None,
        in_channels=package.in_channels,
        out_channels=package.out_channels,
        tile_sizes=tile_sizes(package.geometry, settings.tile_size),
        metrics=package.card.metrics_summary() if package.card else {},
        platform="bioimageio",
    )


def info_of(name: str, path: Path, settings: Settings) -> ModelInfo:
    """What is shown of the model at `path` (raises PackageError for a refused package)."""
    if is_package(path):
        return package_info(name, read_package(path), settings)
    return model_info(name, load_card(path), settings)


def refusal(path: Path) -> str | None:
    """Why the model at `path` cannot be served, known without loading it (a package that
    is not 2D, has no weights the service runs, ...), or None."""
    if not is_package(path):
        return None
    try:
        read_package(path)
    except PackageError as e:
        return str(e)
    return None


def discover(settings: Settings) -> dict[str, Path]:
    """The repository's models by name, in order of name (`scan` of UNET_MODELS), or the one
    model UNET_WEIGHTS names (by its card's name; a bioimage.io package by its file's)."""
    if settings.models is None:
        path = settings.weights
        return {path.stem if is_package(path) else load_card(path).name: path}
    return scan(settings.models)


def scan(folder: Path) -> dict[str, Path]:
    """The models of a repository folder by name, in order of name: its NAME.safetensors with
    a NAME.json beside them and its bioimage.io packages (NAME.zip, or a folder NAME/ with its
    description)."""
    if not folder.is_dir():
        raise ValueError(f"UNET_MODELS={folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ours = path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
        if not ours and not is_package(path):
            continue
        if path.stem in found:
            raise ValueError(
                f"UNET_MODELS={folder} holds two models named {path.stem!r}: "
                f"{found[path.stem].name} and {path.name}"
            )
        found[path.stem] = path
    if not found:
        raise ValueError(
            f"UNET_MODELS={folder} holds no model (NAME.safetensors + NAME.json, or a "
            "bioimage.io package NAME.zip)"
        )
    return dict(sorted(found.items()))


def find_model(folder: Path, name: str) -> Path:
    """Model `name` of a repository folder, as the service finds it (ValueError naming the
    models there otherwise)."""
    models = scan(folder)
    if name not in models:
        raise ValueError(f"no model {name!r} in {folder} (it holds: {', '.join(models)})")
    return models[name]


def open_model(
    path: Path,
    device: str = "auto",
    precision: str = "fp32",
    backend: str = "auto",
    compile: bool = False,
    max_pixels: int = MAX_MEASURED_PIXELS,
) -> TiledModel:
    """The model at `path` on a device: our weights, or a bioimage.io package (run in float32
    by its own weights; `precision` and `compile` are our models'; `max_pixels` bounds the
    images whose statistics it measures). Raises WeightsError or PackageError."""
    if is_package(path):
        return PackageSegmenter.from_package(path, device, backend, max_pixels)
    return Segmenter.from_weights(path, device, precision, backend, compile)


def default_model(settings: Settings, models: dict[str, Path]) -> str:
    """UNET_DEFAULT_MODEL, or else the first model of the repository that can be served."""
    if settings.default_model:
        if settings.default_model not in models:
            raise ValueError(
                f"UNET_DEFAULT_MODEL={settings.default_model} is not a model of the repository "
                f"({', '.join(models)})"
            )
        return settings.default_model
    servable = [name for name, path in models.items() if refusal(path) is None]
    return (servable or list(models))[0]
