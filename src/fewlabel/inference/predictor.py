"""Whole-study prediction: a network's class probabilities for every voxel of a study.

Training sees 2D slices, 2.5D slabs or 3D patches; prediction always rebuilds the whole
study at its (preprocessed) size:

- ``3d``: MONAI's ``sliding_window_inference`` with the training patch size and Gaussian
  blending; patches run on the compute device, the stitched volume stays on the CPU.
- ``2d`` / ``2.5d`` on a volume: slice by slice along ``input.axis`` (2.5D slabs built with
  :func:`fewlabel.data.slices.extract_slab`, exactly as in training), in batches of slices,
  resized to ``slice_size`` and back when the model was trained at a fixed slice size.
- a 2D image: one pass, resized to ``slice_size`` and back.

MONAI's ``SliceInferer`` predicts slice by slice too, but it neither builds 2.5D slabs nor
resizes slices to the training size, hence the slice loop here.

Memory: the output is one float32 tensor of shape ``(K, *spatial)`` allocated once on the
CPU (in 3D, MONAI's sliding window also holds a count map and its window buffers, about
twice that in all); only a batch of slices or patches lives on the device at a time, and
no float64 copy of the volume is ever made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewlabel.config.segmentation import InputConfig, SegmentationEval
from fewlabel.errors import ConfigError

__all__ = ["predict_volume"]


def predict_volume(
    net: nn.Module,
    image: torch.Tensor,
    input_cfg: InputConfig,
    eval_cfg: SegmentationEval,
    spatial_dims: int,
    device: torch.device | str,
    slice_size: tuple[int, int] | None = None,
    *,
    size_divisor: int = 1,
    slice_batch_size: int = 16,
    amp: bool = False,
) -> torch.Tensor:
    """Predict class probabilities for a whole (preprocessed) study.

    With ``eval_cfg.tta`` (2D and 2.5D), each slice's probabilities are averaged over the eight
    in-plane rotations and flips.

    Args:
        net: the segmentation network (logits out); put in eval mode for the call and
            returned to its previous mode afterwards.
        image: the study, channel first: ``(C, X, Y, Z)`` for volumes, ``(C, H, W)`` for 2D images.
        input_cfg: how the network was trained (``mode``, ``slab``, ``axis``, ``patch_size``).
        eval_cfg: sliding-window batch size and overlap (3D).
        spatial_dims: spatial dimensions of ``image`` (3 for volumes, 2 for 2D images).
        device: where the network runs.
        slice_size: ``[H, W]`` the 2D/2.5D model was trained at; slices are resized to it and
            the probabilities back to the slice's own size. ``None`` keeps the native size.
        size_divisor: the network's input sizes must be multiples of this
            (:func:`fewlabel.networks.segmentation.size_divisor`); slices are zero-padded and
            the output cropped back. A slice that would pad to one ``size_divisor`` square is
            padded to twice its width, as instance normalisation needs two voxels at the
            network's deepest level.
        slice_batch_size: slices per forward pass in 2D/2.5D.
        amp: use CUDA autocast (ignored on the CPU).

    Returns:
        Float32 probabilities on the CPU, shape ``(K, *spatial)`` with the input's spatial shape;
        they sum to 1 over the class axis.

    Raises:
        ConfigError: if the input mode does not fit the data (2.5D or 3D on 2D images) or the
            3D patch size is not a multiple of ``size_divisor``.
        ValueError: if ``image`` does not have ``spatial_dims + 1`` dimensions.
    """
    if image.ndim != spatial_dims + 1:
        raise ValueError(
            f"image must be channel-first with {spatial_dims} spatial dims, got shape {tuple(image.shape)}"
        )
    device = torch.device(device)
    image = _plain(image).float()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            if spatial_dims == 2:
                if input_cfg.mode != "2d":
                    raise ConfigError(
                        f"input.mode is {input_cfg.mode!r} but the study is a 2D image; 2D images need mode '2d'"
                    )
                probs = _predict_slices(net, image[None], device, slice_size, size_divisor, eval_cfg.tta)[0]
            elif input_cfg.mode == "3d":
                probs = _predict_3d(net, image, input_cfg, eval_cfg, device, size_divisor)
            else:
                probs = _predict_volume_by_slice(
                    net, image, input_cfg, device, slice_size, size_divisor, slice_batch_size, eval_cfg.tta
                )
    finally:
        net.train(was_training)
    return probs


def _plain(image: torch.Tensor) -> torch.Tensor:
    # MetaTensor tracks every operation on it; prediction needs the values only.
    as_tensor = getattr(image, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else image


def _predict_3d(
    net: nn.Module,
    image: torch.Tensor,
    input_cfg: InputConfig,
    eval_cfg: SegmentationEval,
    device: torch.device,
    size_divisor: int,
) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    roi = tuple(input_cfg.patch_size)
    if any(r % size_divisor for r in roi):
        raise ConfigError(
            f"input.patch_size {list(roi)} must be a multiple of {size_divisor} for this network"
        )
    logits = sliding_window_inference(
        image[None],
        roi_size=roi,
        sw_batch_size=eval_cfg.sw_batch_size,
        predictor=net,
        overlap=eval_cfg.sw_overlap,
        mode="gaussian",
        sw_device=device,
        device=torch.device("cpu"),
    )
    probs = _plain(logits)[0].float()
    # Softmax in place: torch.softmax would hold a second (K, *spatial) copy beside the logits.
    probs -= probs.amax(dim=0, keepdim=True)
    probs.exp_()
    probs /= probs.sum(dim=0, keepdim=True)
    return probs


def _predict_volume_by_slice(
    net: nn.Module,
    volume: torch.Tensor,
    input_cfg: InputConfig,
    device: torch.device,
    slice_size: tuple[int, int] | None,
    size_divisor: int,
    slice_batch_size: int,
    tta: bool = False,
) -> torch.Tensor:
    from fewlabel.data.slices import extract_slab

    axis = input_cfg.axis
    slab = input_cfg.slab if input_cfg.mode == "2.5d" else 1
    n_slices = volume.shape[axis + 1]
    out: torch.Tensor | None = None
    for start in range(0, n_slices, max(1, slice_batch_size)):
        indices = range(start, min(start + slice_batch_size, n_slices))
        batch = torch.stack([extract_slab(volume, i, slab, axis) for i in indices])
        probs = _predict_slices(net, batch, device, slice_size, size_divisor, tta)
        if out is None:
            shape = list(volume.shape)
            shape[0] = probs.shape[1]
            out = torch.empty(shape, dtype=torch.float32)
        # select() on the slicing axis is a view with the two in-plane axes in order, i.e. the
        # same (H, W) layout extract_slab produced.
        for j, i in enumerate(indices):
            out.select(axis + 1, i).copy_(probs[j])
    assert out is not None  # a volume has at least one slice (readers reject empty volumes)
    return out


def _predict_slices(
    net: nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    slice_size: tuple[int, int] | None,
    size_divisor: int,
    tta: bool = False,
) -> torch.Tensor:
    """Probabilities ``(B, K, H, W)`` on the CPU for a CPU batch ``(B, C, H, W)``.

    With ``tta`` the probabilities are averaged over the eight in-plane rotations and flips
    (each prediction mapped back with the inverse transform), the same group TCSM trains on.
    """
    from fewlabel.transforms.consistency import InPlaneTransform

    height, width = batch.shape[-2:]
    x = batch.to(device)
    if slice_size is not None and (height, width) != tuple(slice_size):
        x = F.interpolate(x, size=tuple(slice_size), mode="bilinear", align_corners=False)
    transforms = [InPlaneTransform(k, flip) for k in range(4) for flip in (False, True)] if tta else []
    probs = _softmax_padded(net, x, size_divisor)
    for t in transforms[1:]:  # the first is the identity, already computed
        probs += t.inverse(_softmax_padded(net, t(x), size_divisor))
    if transforms:
        probs /= len(transforms)
    if probs.shape[-2:] != (height, width):
        # Interpolating probabilities (not logits) keeps them summing to one.
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs.cpu()


def _softmax_padded(net: nn.Module, x: torch.Tensor, size_divisor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % size_divisor, (-w) % size_divisor
    if size_divisor > 1 and (h + pad_h) == (w + pad_w) == size_divisor:
        # Instance normalisation needs two voxels at the deepest level, at inference too.
        pad_w += size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    logits = _plain(net(x))[..., :h, :w].float()
    return torch.softmax(logits, dim=1)
