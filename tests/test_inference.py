"""Whole-study prediction: shapes for every input mode, exact slice-by-slice reconstruction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewlabel.config.segmentation import InputConfig, SegmentationEval, SegmentationModel
from fewlabel.errors import ConfigError
from fewlabel.inference import predict_volume
from fewlabel.networks.segmentation import build_segmentation_net, size_divisor

TINY_BASIC = SegmentationModel(features=(4, 4, 8, 8, 16, 4))


class CentreChannelNet(nn.Module):
    """Logits that are a fixed per-pixel function of the centre input channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2]
        return torch.stack([torch.zeros_like(centre), 3 * centre - 1, centre**2], dim=1)


def reference_probs(volume: torch.Tensor) -> torch.Tensor:
    """The same function applied to the whole (1, ...) volume at once."""
    return torch.softmax(CentreChannelNet()(volume[None])[0], dim=0)


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_modes_rebuild_the_exact_per_slice_result(mode, axis):
    volume = torch.rand(1, 9, 14, 5)  # odd, non-square, every axis a different length
    probs = predict_volume(
        CentreChannelNet(),
        volume,
        InputConfig(mode=mode, slab=3, axis=axis),
        SegmentationEval(),
        spatial_dims=3,
        device="cpu",
        slice_batch_size=4,  # several batches, the last one partial
    )
    assert probs.shape == (3, 9, 14, 5)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, reference_probs(volume), rtol=0, atol=1e-6)


def test_slab_channels_reach_the_network_in_order():
    """In 2.5D the network sees the slice and its neighbours; the centre channel is the slice."""
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    volume = torch.arange(4, dtype=torch.float32).reshape(1, 1, 1, 4).expand(1, 3, 2, 4).contiguous()
    predict_volume(Recorder(), volume, InputConfig(mode="2.5d", slab=3, axis=2), SegmentationEval(), 3, "cpu")
    batch = torch.cat(seen)
    assert batch.shape == (4, 3, 3, 2)
    # Slice 0 repeats the border slice before it; the last slice repeats itself after it.
    assert batch[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_real_network_with_resizing_and_padding_keeps_the_volume_shape(mode):
    net = build_segmentation_net(TINY_BASIC, 2, 3 if mode == "2.5d" else 1, 3)
    volume = torch.rand(1, 13, 19, 7)
    probs = predict_volume(
        net,
        volume,
        InputConfig(mode=mode, slab=3, axis=2),
        SegmentationEval(),
        3,
        "cpu",
        slice_size=(24, 20),
        size_divisor=size_divisor(TINY_BASIC),
    )
    assert probs.shape == (3, 13, 19, 7)
    torch.testing.assert_close(probs.sum(0), torch.ones(13, 19, 7))
    assert net.training, "the network's mode is restored after prediction"


def test_slices_smaller_than_the_network_depth_are_padded_enough():
    # 12 x 12 pads to 16 x 16, which the deepest level would halve to one voxel: instance
    # normalisation refuses that even in eval mode, so the slice is padded wider.
    net = build_segmentation_net(TINY_BASIC, 2, 1, 2)
    probs = predict_volume(
        net, torch.rand(1, 12, 12, 3), InputConfig(mode="2d"), SegmentationEval(), 3, "cpu", size_divisor=16
    )
    assert probs.shape == (2, 12, 12, 3)
    torch.testing.assert_close(probs.sum(0), torch.ones(12, 12, 3))


def test_3d_sliding_window_covers_the_whole_volume():
    volume = torch.rand(1, 21, 17, 9)  # larger than the patch along some axes, smaller along none
    probs = predict_volume(
        CentreChannelNet(),
        volume,
        InputConfig(mode="3d", patch_size=(8, 8, 4)),
        SegmentationEval(sw_batch_size=2, sw_overlap=0.5),
        3,
        "cpu",
    )
    assert probs.shape == (3, 21, 17, 9)
    # A per-voxel function blends to itself whatever the window weights.
    torch.testing.assert_close(probs, reference_probs(volume), rtol=0, atol=1e-5)


def test_3d_unet_with_volume_smaller_than_the_patch():
    cfg = SegmentationModel(name="unet", features=(4, 8, 16))
    net = build_segmentation_net(cfg, 3, 1, 2)
    probs = predict_volume(
        net,
        torch.rand(1, 11, 6, 3),
        InputConfig(mode="3d", patch_size=(8, 8, 4)),
        SegmentationEval(),
        3,
        "cpu",
        size_divisor=size_divisor(cfg),
    )
    assert probs.shape == (2, 11, 6, 3)


def test_2d_image_is_one_pass_resized_and_back():
    image = torch.rand(1, 15, 22)
    probs = predict_volume(
        CentreChannelNet(), image, InputConfig(mode="2d"), SegmentationEval(), 2, "cpu", slice_size=(15, 22)
    )
    torch.testing.assert_close(probs, reference_probs(image), rtol=0, atol=1e-6)
    net = build_segmentation_net(TINY_BASIC, 2, 1, 3)
    resized = predict_volume(
        net, image, InputConfig(mode="2d"), SegmentationEval(), 2, "cpu", slice_size=(32, 32)
    )
    assert resized.shape == (3, 15, 22)


def test_modes_that_do_not_fit_the_data_are_refused():
    with pytest.raises(ConfigError, match="2D image"):
        predict_volume(
            CentreChannelNet(), torch.rand(1, 8, 8), InputConfig(mode="2.5d"), SegmentationEval(), 2, "cpu"
        )
    with pytest.raises(ConfigError, match="multiple of 16"):
        predict_volume(
            CentreChannelNet(),
            torch.rand(1, 8, 8, 8),
            InputConfig(mode="3d", patch_size=(8, 8, 8)),
            SegmentationEval(),
            3,
            "cpu",
            size_divisor=16,
        )
    with pytest.raises(ValueError, match="channel-first"):
        predict_volume(CentreChannelNet(), torch.rand(8, 8, 8), InputConfig(), SegmentationEval(), 3, "cpu")


class _PixelwiseNet(nn.Module):
    """A 1x1 convolution: equivariant to every rotation and flip."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ShiftedNet(nn.Module):
    """Looks one pixel to the right: not equivariant, so test-time augmentation changes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = torch.roll(x, shifts=-1, dims=-1)
        return torch.cat([x, right, x - right], dim=1)


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_tta_keeps_equivariant_predictions_and_shapes(mode):
    volume = torch.rand(1, 7, 10, 3)  # non-square slices
    net = _PixelwiseNet()
    if mode == "2.5d":
        net.conv = nn.Conv2d(3, 3, 1)
    cfg = InputConfig(mode=mode, slab=3 if mode == "2.5d" else 1)
    plain = predict_volume(net, volume, cfg, SegmentationEval(), 3, "cpu")
    tta = predict_volume(net, volume, cfg, SegmentationEval(tta=True), 3, "cpu")
    assert tta.shape == plain.shape == (3, 7, 10, 3)
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=1e-5)


def test_tta_averages_the_eight_views():
    image = torch.rand(1, 6, 6)
    cfg = InputConfig(mode="2d")
    plain = predict_volume(_ShiftedNet(), image, cfg, SegmentationEval(), 2, "cpu")
    tta = predict_volume(_ShiftedNet(), image, cfg, SegmentationEval(tta=True), 2, "cpu")
    assert not torch.allclose(tta, plain)
    torch.testing.assert_close(tta.sum(0), torch.ones(6, 6))
    views = []
    for k in range(4):
        for flip in (False, True):
            x = torch.rot90(image[None], k, (2, 3))
            x = x.flip(3) if flip else x
            p = torch.softmax(_ShiftedNet()(x), 1)
            p = p.flip(3) if flip else p
            views.append(torch.rot90(p, -k, (2, 3)))
    torch.testing.assert_close(tta, torch.stack(views).mean(0)[0])
