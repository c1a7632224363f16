"""Valid-convolution U-Net, exact overlap-tile inference, and the weights format."""

from model.engine import DEFAULT_WEIGHTS, Segmentation, Segmenter, resolve_device
from model.geometry import Geometry
from model.tiling import Stitcher, Tile, TilePlan, mirror_pad, reflect_indices
from model.unet import UNet, UNetConfig
from model.weights import ModelCard, WeightsError, load_weights, save_weights

__all__ = [
    "DEFAULT_WEIGHTS",
    "Geometry",
    "ModelCard",
    "Segmentation",
    "Segmenter",
    "Stitcher",
    "Tile",
    "TilePlan",
    "UNet",
    "UNetConfig",
    "WeightsError",
    "load_weights",
    "mirror_pad",
    "reflect_indices",
    "resolve_device",
    "save_weights",
]
