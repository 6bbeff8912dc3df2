"""Segmentation networks, picked from MONAI by name.

``basicunet`` is MONAI's ``BasicUNet`` (two convolutions per level, six feature counts,
four max-poolings): it pads odd feature maps itself but needs at least 16 voxels per axis.
``unet`` is MONAI's ``UNet`` with two residual units per level and stride-2 downsampling:
its input sizes must be divisible by ``2 ** (levels - 1)``. :func:`size_divisor` gives the
multiple that inference pads every input to, which satisfies both.

Training asks one thing more: both networks normalise each feature map per sample (instance
normalisation), which cannot be trained on a map of one voxel, so the deepest level must keep
at least two. :func:`check_training_size` checks a training input against both rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from fewlabel.config.segmentation import SegmentationModel
from fewlabel.errors import ConfigError

__all__ = ["build_segmentation_net", "check_training_size", "size_divisor"]


def build_segmentation_net(
    model_cfg: SegmentationModel, spatial_dims: int, in_channels: int, out_channels: int
) -> nn.Module:
    """Build the segmentation network described by ``model_cfg``.

    Args:
        model_cfg: the ``model`` section of a segmentation config.
        spatial_dims: 2 for 2D and 2.5D inputs, 3 for 3D patches.
        in_channels: input channels (the slab size for 2.5D, else the image channels).
        out_channels: number of classes, background included (the network emits logits).

    Returns:
        The (randomly initialised) network.

    Raises:
        ConfigError: if the feature list does not fit the chosen architecture, or the
            dimensions/channels are out of range.
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or out_channels < 2:
        raise ConfigError(
            f"a segmentation network needs >= 1 input channel and >= 2 classes, got {in_channels} and {out_channels}"
        )
    features = tuple(int(f) for f in model_cfg.features)
    if any(f < 1 for f in features):
        raise ConfigError(f"model.features: every entry must be positive, got {list(features)}")
    if model_cfg.name == "basicunet":
        from monai.networks.nets import BasicUNet

        if len(features) != 6:
            raise ConfigError(
                f"model.features: basicunet takes six numbers (five encoder levels + the last decoder), "
                f"got {len(features)}: {list(features)}"
            )
        return BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            dropout=model_cfg.dropout,
        )
    from monai.networks.nets import UNet

    if len(features) < 2:
        raise ConfigError(f"model.features: unet needs at least two levels, got {list(features)}")
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=features,
        strides=(2,) * (len(features) - 1),
        num_res_units=2,
        dropout=model_cfg.dropout,
    )


def size_divisor(model_cfg: SegmentationModel) -> int:
    """Input sizes the network needs to be divisible by (per spatial axis).

    Args:
        model_cfg: the ``model`` section.

    Returns:
        ``2 ** downsamplings``: 16 for ``basicunet`` (it copes with odd sizes but not with
        fewer than 16 voxels), ``2 ** (levels - 1)`` for ``unet``.
    """
    if model_cfg.name == "basicunet":
        return 16
    return 2 ** (len(model_cfg.features) - 1)


def check_training_size(model_cfg: SegmentationModel, shape: Sequence[int], what: str, setting: str) -> None:
    """Refuse training inputs the network cannot take, before the first step fails inside it.

    Args:
        model_cfg: the ``model`` section.
        shape: spatial size of one training input (a slice ``(H, W)`` or a 3D patch).
        what: what has this size, for the message (e.g. ``"the slices of case_001.nii.gz"``).
        setting: the config key that changes the size, for the message.

    Raises:
        ConfigError: if ``unet`` gets sizes that are not multiples of :func:`size_divisor`, or
            the deepest level would hold a single voxel (or none), which instance
            normalisation cannot train on.
    """
    factor = size_divisor(model_cfg)
    shape = tuple(int(s) for s in shape)
    size = "x".join(map(str, shape))
    network = (
        "model 'basicunet'"
        if model_cfg.name == "basicunet"
        else f"model 'unet' with {len(model_cfg.features)} feature levels"
    )
    if model_cfg.name == "unet" and any(s % factor for s in shape):
        raise ConfigError(
            f"{what} are {size}, but {network} needs every size to be a multiple of {factor}; "
            f"set {setting} to multiples of {factor}"
        )
    if math.prod(s // factor for s in shape) < 2:
        raise ConfigError(
            f"{what} are {size}: {network} halves them {int(math.log2(factor))} times, which leaves "
            f"{'x'.join(str(s // factor) for s in shape)} voxels at the deepest level, and instance "
            f"normalisation cannot train on fewer than two; set {setting} so that at least one size "
            f"is {2 * factor} or more, or use fewer levels (model.name: unet with a shorter model.features)"
        )
