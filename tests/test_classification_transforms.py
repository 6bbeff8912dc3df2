"""Tests for the classification preprocessing and rotation-only augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from PIL import Image

from fewlabel.config.classification import ClassificationAugment
from fewlabel.data.classification_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_augment_transforms,
    build_classification_transforms,
    build_decode_transforms,
    make_dataset,
    normalization_for,
)
from fewlabel.errors import DataError

SIZE = 16


def _image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    # Distinct values per pixel and channel, so that any geometric change is visible.
    return (
        np.random.default_rng(seed)
        .permutation(256)[np.arange(size * size * 3) % 256]
        .reshape(size, size, 3)
        .astype(np.uint8)
    )


def _as_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255.0


def _rotation_of(out: torch.Tensor, ref: torch.Tensor) -> int | None:
    for k in range(4):
        if torch.equal(out, torch.rot90(ref, k, dims=(1, 2))):
            return k
    return None


def test_training_augmentation_only_rotates():
    img = _image()
    ref = _as_chw(img)
    tf = build_classification_transforms(SIZE, True, ClassificationAugment(), None, None, normalize=False)
    seen = set()
    for seed in range(40):
        tf.set_random_state(seed=seed)
        out = tf({"image": img, "label": 1})["image"]
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        # Same pixel values, only moved: no colour or intensity change.
        torch.testing.assert_close(out.flatten().sort().values, ref.flatten().sort().values, rtol=0, atol=0)
        k = _rotation_of(out, ref)
        assert k is not None, "output is not a 90-degree rotation of the input"
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_flip_and_no_rotation_options():
    img = _image(1)
    ref = _as_chw(img)
    fixed = build_classification_transforms(
        SIZE, True, ClassificationAugment(rotate90=False), None, None, normalize=False
    )
    assert torch.equal(fixed({"image": img})["image"], ref)

    flips = build_classification_transforms(
        SIZE, True, ClassificationAugment(rotate90=False, flip=True), None, None, normalize=False
    )
    outs = set()
    for seed in range(20):
        flips.set_random_state(seed=seed)
        out = flips({"image": img})["image"]
        if torch.equal(out, ref):
            outs.add("same")
        elif torch.equal(out, torch.flip(ref, dims=(2,))):
            outs.add("flipped")
    assert outs == {"same", "flipped"}


def test_evaluation_pipeline_is_deterministic():
    img = _image(2)
    tf = build_classification_transforms(
        SIZE, False, ClassificationAugment(flip=True), None, None, normalize=False
    )
    for seed in range(5):
        tf.set_random_state(seed=seed)
        assert torch.equal(tf({"image": img})["image"], _as_chw(img))


def test_normalisation_grey_to_rgb_and_resize(tmp_path):
    grey = np.full((40, 24), 128, dtype=np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    mean, std = normalization_for("imagenet")
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
    tf = build_classification_transforms(32, False, ClassificationAugment(), mean, std)
    out = tf({"image": str(path), "label": 3, "id": "grey", "patient_id": None})
    assert out["image"].shape == (3, 32, 32)
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out["image"].mean(dim=(1, 2)), expected, rtol=0, atol=1e-5)
    assert out["label"].dtype == torch.long and int(out["label"]) == 3
    assert out["patient_id"] == ""

    scratch_mean, scratch_std = normalization_for("none")
    assert scratch_mean == (0.5, 0.5, 0.5) and scratch_std == (0.5, 0.5, 0.5)
    white = build_classification_transforms(8, False, ClassificationAugment(), scratch_mean, scratch_std)
    out = white({"image": np.full((8, 8, 1), 255, np.uint8)})["image"]
    torch.testing.assert_close(out, torch.ones(3, 8, 8))


@pytest.mark.parametrize("shape", [(480, 640), (70, 50), (33, 32)])
def test_shrinking_keeps_a_flat_image_flat_to_its_edges(shape):
    # Colour carries the diagnosis: resizing may blur, but not darken the border.
    image = np.full((*shape, 3), 200, dtype=np.uint8)
    out = torch.as_tensor(build_decode_transforms(32)({"image": image})["image"])
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy() * 255, 200.0, atol=1e-3)


def test_enlarging_is_plain_bilinear_interpolation():
    from monai.transforms import Resize

    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    out = torch.as_tensor(build_decode_transforms(64)({"image": image})["image"])
    plain = Resize((64, 64), mode="bilinear")(
        torch.tensor(image.transpose(2, 0, 1), dtype=torch.float32) / 255
    )
    np.testing.assert_allclose(out.numpy(), torch.as_tensor(plain).numpy(), atol=1e-6)


def test_bad_input_raises_data_error_not_wrapped(tmp_path):
    tf = build_decode_transforms(8)
    with pytest.raises(DataError, match="shape"):
        tf({"image": np.zeros((2, 8, 8, 3), np.uint8), "id": "bad"})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    ds = make_dataset([{"image": str(broken), "label": 0}], tf, None, cache=False)
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


@pytest.mark.parametrize("cache", [True, False])
def test_make_dataset_caches_decoding_and_keeps_augmenting(cache):
    records = [{"image": _image(i), "label": i % 2, "id": f"r{i}", "patient_id": None} for i in range(4)]
    ds = make_dataset(
        records,
        build_decode_transforms(SIZE),
        build_augment_transforms(True, ClassificationAugment(), None, None, normalize=False),
        cache=cache,
        seed=0,
    )
    assert isinstance(ds.data, CacheDataset) == cache
    ref = _as_chw(records[0]["image"])
    rotations = {_rotation_of(ds[0]["image"], ref) for _ in range(30)}
    assert None not in rotations and len(rotations) > 1, "random rotation must apply on every access"
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert batch["label"].tolist() == [0, 1, 0, 1]
    assert list(batch["id"]) == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("cache", [True, False])
def test_cached_images_are_not_changed_by_their_augmentation(cache):
    # Channel-wise normalisation writes into its input, and a draw without rotation or flip
    # hands it the cached tensor itself: reading a cached sample again must still give the
    # same values (it once compounded every epoch).
    records = [{"image": _image(i), "label": i % 2, "id": f"r{i}", "patient_id": None} for i in range(2)]
    ds = make_dataset(
        records,
        build_decode_transforms(SIZE),
        build_augment_transforms(True, ClassificationAugment(flip=True), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        cache=cache,
    )
    for _ in range(8):
        for i in range(len(records)):
            ds[i]  # unseeded draws, as an epoch without a resumable sampler makes
    for seed in range(40):
        first = ds[(0, seed)]["image"].clone()
        again = ds[(0, seed)]["image"]
        assert torch.equal(first, again), f"seed {seed}"
        assert float(first.min()) >= -1.0 - 1e-6 and float(first.max()) <= 1.0 + 1e-6
