"""Segmentation networks: built from the config for 2D, 2.5D and 3D inputs."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet

from fewlabel.config.segmentation import SegmentationModel
from fewlabel.errors import ConfigError
from fewlabel.networks.segmentation import build_segmentation_net, check_training_size, size_divisor

TINY_BASIC = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize(
    ("spatial_dims", "in_channels", "shape"),
    [(2, 1, (2, 1, 32, 48)), (2, 5, (2, 5, 32, 48)), (3, 1, (1, 1, 32, 32, 16))],
    ids=["2d", "2.5d", "3d"],
)
def test_basicunet_outputs_one_logit_map_per_class(spatial_dims, in_channels, shape):
    net = build_segmentation_net(SegmentationModel(features=TINY_BASIC), spatial_dims, in_channels, 3)
    assert isinstance(net, BasicUNet)
    with torch.no_grad():
        out = net(torch.rand(shape))
    assert out.shape == (shape[0], 3, *shape[2:])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_has_residual_units_and_takes_features_as_channels(spatial_dims):
    cfg = SegmentationModel(name="unet", features=(4, 8, 16), dropout=0.1)
    net = build_segmentation_net(cfg, spatial_dims, 3 if spatial_dims == 2 else 1, 2)
    assert isinstance(net, UNet)
    assert tuple(net.channels) == (4, 8, 16)
    assert net.num_res_units == 2
    assert size_divisor(cfg) == 4
    shape = (1, 3, 16, 24) if spatial_dims == 2 else (1, 1, 16, 16, 8)
    with torch.no_grad():
        assert net(torch.rand(shape)).shape == (1, 2, *shape[2:])


def test_basicunet_needs_six_features():
    with pytest.raises(ConfigError, match="six numbers"):
        build_segmentation_net(SegmentationModel(features=(4, 8, 16)), 2, 1, 2)
    assert size_divisor(SegmentationModel(features=TINY_BASIC)) == 16


def test_bad_dimensions_and_classes_are_config_errors():
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_segmentation_net(SegmentationModel(features=TINY_BASIC), 1, 1, 2)
    with pytest.raises(ConfigError, match="2 classes"):
        build_segmentation_net(SegmentationModel(features=TINY_BASIC), 2, 1, 1)


def _trains(net: torch.nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        net.train()
        net(torch.rand(2, 1, *shape)).sum().backward()
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (SegmentationModel(features=(2, 2, 2, 2, 2, 2)), shape)
        for shape in [(12, 12), (16, 16), (31, 31), (32, 32), (16, 32), (15, 48), (17, 40)]
    ]
    + [
        (SegmentationModel(name="unet", features=(2, 2, 2)), shape)
        for shape in [(4, 4), (4, 8), (8, 8), (10, 8), (12, 8)]
    ]
    + [(SegmentationModel(features=(2, 2, 2, 2, 2, 2)), shape) for shape in [(16, 16, 16), (16, 16, 32)]],
)
def test_training_size_check_matches_what_the_network_can_train_on(cfg, shape):
    # The rule is checked against the networks themselves: it refuses exactly the sizes on
    # which a training step fails (inside MONAI, with a message that names no file or setting).
    net = build_segmentation_net(cfg, len(shape), 1, 2)
    try:
        check_training_size(cfg, shape, "the slices of a.nii.gz", "preprocess.slice_size")
        accepted = True
    except ConfigError as err:
        assert "a.nii.gz" in str(err) and "preprocess.slice_size" in str(err)
        accepted = False
    assert accepted == _trains(net, shape)
