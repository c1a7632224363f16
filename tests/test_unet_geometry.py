"""The architecture and its size arithmetic, for the tutorial's network and depths 2..5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_service.core.geometry import Geometry
from unet_service.core.tiling import Stitcher, TilePlan
from unet_service.core.unet import UNet

TUTORIAL_CHANNELS = [3, 64, 128, 256, 512, 1024]


def out_size(model: UNet, size: int, in_channels: int) -> tuple[int, ...]:
    # Shapes on the meta device: the full-size tutorial network costs no compute here.
    with torch.no_grad():
        return tuple(model(torch.empty(1, in_channels, size, size, device="meta")).shape)


def test_tutorial_network_maps_572_to_388() -> None:
    model = UNet(channels=TUTORIAL_CHANNELS, out_channels=1).to("meta")
    assert out_size(model, 572, 3) == (1, 1, 388, 388)


def test_tutorial_layers_are_valid_convolutions_with_batchnorm() -> None:
    model = UNet(channels=TUTORIAL_CHANNELS, out_channels=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.padding == (0, 0) and c.stride == (1, 1) for c in convs)
    assert sum(c.kernel_size == (3, 3) for c in convs) == 18  # 9 double convs
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.stride) for u in ups] == [
        (1024, 512, (2, 2)),
        (512, 256, (2, 2)),
        (256, 128, (2, 2)),
        (128, 64, (2, 2)),
    ]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 18
    assert sum(p.numel() for p in model.parameters()) > 31_000_000


def test_real_forward_small_channels_at_572() -> None:
    model = UNet(channels=[3, 2, 2, 2, 2, 2], out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 572, 572)).shape == (2, 2, 388, 388)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_geometry_formulas(depth: int) -> None:
    g = Geometry(depth)
    assert g.step == 2**depth
    assert g.shrink == 12 * 2**depth - 8
    assert g.margin == 6 * 2**depth - 4 == g.shrink // 2
    model = UNet(channels=[1] + [2] * (depth + 1)).to("meta")
    for j in (0, 1, 5):
        output = 4 + 2**depth * j
        assert g.is_legal_output(output)
        assert g.input_for_output(output) == output + g.shrink
        assert out_size(model, output + g.shrink, 1)[-1] == output


def test_depth_4_numbers() -> None:
    g = Geometry(4)
    assert (g.shrink, g.margin, g.tile_stride(388), g.input_for_output(388)) == (184, 92, 384, 572)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_illegal_sizes_raise_and_name_the_nearest_legal_ones(depth: int) -> None:
    g = Geometry(depth)
    step = 2**depth
    bad = 4 + step * 3 + 1
    with pytest.raises(ValueError, match=rf"{4 + step * 3}.*{4 + step * 4}"):
        g.check_output(bad)
    with pytest.raises(ValueError, match=rf"{4 + step * 3 + g.shrink}"):
        g.output_for_input(bad + g.shrink)
    with pytest.raises(ValueError, match="nearest legal: 4"):
        g.check_output(2)


def test_illegal_input_size_breaks_the_real_network_arithmetic() -> None:
    # Why sizes are checked: an odd size before a pooling silently drops a row, and the
    # output no longer lines up with the input (output != input - shrink).
    g = Geometry(2)
    model = UNet(channels=[1, 2, 2, 2]).to("meta")
    legal = g.input_for_output(8)
    assert out_size(model, legal, 1)[-1] == legal - g.shrink
    assert out_size(model, legal + 2, 1)[-1] != legal + 2 - g.shrink
    with pytest.raises(ValueError):
        g.output_for_input(legal + 2)


def test_smallest_output_covering_and_stride() -> None:
    g = Geometry(4)
    assert g.smallest_output_covering(1) == 4
    assert g.smallest_output_covering(64) == 68
    assert g.smallest_output_covering(388) == 388
    assert g.tile_stride(20) == 16
    assert g.tile_stride(516) == 512


@pytest.mark.parametrize(("depth", "smallest"), [(1, 4), (2, 4), (3, 12), (4, 20), (5, 36)])
def test_tiles_narrower_than_the_stride_are_refused(depth: int, smallest: int) -> None:
    """Tile origins are multiples of 2^d: a narrower tile would leave unwritten gaps."""
    g = Geometry(depth)
    assert g.min_tile == smallest
    assert g.tile_stride(smallest) <= smallest
    for legal in range(4, 300, g.step):
        if legal < smallest:
            with pytest.raises(ValueError, match=f"smallest legal tile: {smallest}"):
                g.tile_stride(legal)
            with pytest.raises(ValueError, match="gaps"):
                TilePlan(40, 40, g, legal)
        else:
            assert g.step <= g.tile_stride(legal) <= legal
            plan = TilePlan(70, 90, g, legal)
            stitcher = Stitcher(plan, 1, np.uint8, track_coverage=True)
            for tile in plan:
                stitcher.aggregate(np.zeros((1, legal, legal), np.uint8), tile)
            assert (stitcher.coverage == 1).all()
