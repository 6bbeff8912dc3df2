"""2D slices, 2.5D slabs (edges replicate the border slice) and 3D patches from preprocessed volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewlabel.config import parse_config
from fewlabel.data.segmentation import build_datalist
from fewlabel.data.slices import (
    PatchDataset,
    SliceDataset,
    build_training_dataset,
    extract_slab,
    volume_to_samples,
)
from fewlabel.data.synthetic_ct import make_synthetic_ct
from fewlabel.errors import ConfigError


def _volume(c: int = 1, x: int = 3, y: int = 4, z: int = 5) -> torch.Tensor:
    # Voxel value encodes (channel, slice along z) so that slabs can be read back.
    vol = torch.zeros(c, x, y, z)
    for ch in range(c):
        for k in range(z):
            vol[ch, :, :, k] = 100 * ch + k
    return vol


def test_slab_in_the_middle() -> None:
    vol = _volume(c=2)
    slab = extract_slab(vol, 2, 3, axis=2)
    assert slab.shape == (6, 3, 4)
    assert [float(slab[i, 0, 0]) for i in range(6)] == [1, 2, 3, 101, 102, 103]


@pytest.mark.parametrize(("index", "expected"), [(0, [0, 0, 0, 1, 2]), (4, [2, 3, 4, 4, 4])])
def test_slab_at_the_edges_replicates_border_slices(index: int, expected: list[int]) -> None:
    vol = _volume(c=1, z=5)
    slab = extract_slab(vol, index, 5, axis=2)
    assert [float(slab[i, 1, 1]) for i in range(5)] == expected
    # The centre channel is the slice itself.
    torch.testing.assert_close(slab[2], vol[0, :, :, index])


def test_slab_along_other_axes_keeps_in_plane_order() -> None:
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    slab = extract_slab(vol, 1, 3, axis=0)
    assert slab.shape == (6, 4, 5)
    torch.testing.assert_close(slab[1], vol[0, 1])
    torch.testing.assert_close(slab[4], vol[1, 1])
    torch.testing.assert_close(extract_slab(vol, 0, 1, axis=1)[0], vol[0, :, 0, :])
    with pytest.raises(ValueError, match="odd"):
        extract_slab(vol, 0, 2, axis=2)
    with pytest.raises(ValueError, match="outside"):
        extract_slab(vol, 5, 1, axis=2)


def test_volume_to_samples_covers_every_slice() -> None:
    vol = _volume(z=4)
    label = (vol > 1).long()
    samples = volume_to_samples(vol, label, "2.5d", 3, axis=2)
    assert [s["slice"] for s in samples] == [0, 1, 2, 3]
    assert samples[0]["image"].shape == (3, 3, 4) and samples[0]["label"].shape == (1, 3, 4)
    assert float(samples[3]["label"].float().mean()) == 1.0 and float(samples[0]["label"].sum()) == 0
    assert "label" not in volume_to_samples(vol, None, "2d", 3, axis=2)[0]
    with pytest.raises(ConfigError):
        volume_to_samples(vol, label, "3d", 3, axis=2)


def test_slice_dataset_foreground_sampling_and_resize() -> None:
    image = torch.rand(1, 6, 6, 20)
    label = torch.zeros(1, 6, 6, 20, dtype=torch.uint8)
    label[0, 2:4, 2:4, 17] = 1  # one foreground slice out of twenty
    volumes = [{"image": image, "label": label, "id": "v0"}]
    plain = SliceDataset(volumes, mode="2d", axis=2)
    assert len(plain) == 20 and plain.foreground == []
    sample = plain[17]
    assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.long
    assert int(sample["label"].sum()) == 4 and sample["slice"] == 17 and sample["id"] == "v0"

    torch.manual_seed(0)
    ds = SliceDataset(volumes, mode="2.5d", slab=3, axis=2, slice_size=(8, 8), foreground_ratio=0.5)
    assert ds.foreground == [17]
    draws = [ds[i % 20] for i in range(200)]
    share = np.mean([d["slice"] == 17 for d in draws])
    assert 0.35 < share < 0.65  # about half, not the natural 1/20
    assert draws[0]["image"].shape == (3, 8, 8) and draws[0]["label"].shape == (1, 8, 8)
    assert set(torch.cat([d["label"].flatten() for d in draws]).tolist()) <= {0, 1}


def test_slice_dataset_unlabelled_and_2d_images() -> None:
    volumes = [{"image": torch.rand(1, 5, 7), "id": "a"}, {"image": torch.rand(1, 5, 7), "id": "b"}]
    ds = SliceDataset(volumes, mode="2d")
    assert len(ds) == 2 and not ds.labeled
    assert [ds.volume_of(i) for i in range(2)] == [0, 1]
    assert [SliceDataset(volumes * 2, mode="2d").volume_of(i) for i in range(4)] == [0, 1, 2, 3]
    stack = SliceDataset(
        [{"image": torch.rand(1, 4, 4, 3)}, {"image": torch.rand(1, 4, 4, 2)}], labeled=False
    )
    assert [stack.volume_of(i) for i in range(len(stack))] == [0, 0, 0, 1, 1]
    assert set(ds[1]) == {"image", "slice", "id"} and ds[1]["image"].shape == (1, 5, 7)
    with pytest.raises(ConfigError, match="2.5D slabs need volumes"):
        SliceDataset(volumes, mode="2.5d", slab=3)


def test_patch_dataset_is_map_style_with_fixed_patch_size() -> None:
    image = torch.rand(1, 10, 10, 4)
    label = torch.zeros(1, 10, 10, 4, dtype=torch.uint8)
    label[0, 7:9, 7:9, 1:3] = 1
    torch.manual_seed(0)
    ds = PatchDataset([{"image": image, "label": label, "id": "v"}], (6, 6, 6), 4, foreground_ratio=1.0)
    assert len(ds) == 4
    for i in range(4):
        patch = ds[i]
        assert patch["image"].shape == (1, 6, 6, 6) and patch["label"].shape == (1, 6, 6, 6)
        assert int(patch["label"].sum()) > 0  # foreground_ratio=1: every patch sees the lesion
    unl = PatchDataset([{"image": image}, {"image": image}], (6, 6, 2), 2)
    assert [unl.volume_of(i) for i in range(len(unl))] == [0, 0, 1, 1]
    assert not unl.labeled and set(unl[0]) == {"image", "id"} and unl[0]["image"].shape == (1, 6, 6, 2)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return make_synthetic_ct(tmp_path / "syn", n_labeled=3, n_unlabeled=1, shape=(16, 16, 6), seed=1)


def _cfg(path: Path, **inp) -> object:
    return parse_config(
        {
            "task": "segmentation",
            "data": {"path": str(path), "val_fraction": 0.0},
            "preprocess": {"spacing": [1.6, 1.6, 2.5], "slice_size": [8, 8]},
            "input": inp,
        }
    )


def test_build_training_dataset_modes(synthetic: Path) -> None:
    cfg = _cfg(synthetic, mode="2.5d", slab=3)
    dl = build_datalist(cfg.data, seed=0)
    train = build_training_dataset(dl.train, cfg, train=True, classes=dl.classes)
    assert len(train) == 3 * 6  # 6 axial slices per volume (the z spacing is kept)
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].shape == (4, 1, 8, 8)
    assert batch["label"].dtype == torch.long and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    unl = build_training_dataset(dl.unlabeled, cfg, train=True, labeled=False, classes=dl.classes)
    assert len(unl) == 6 and "label" not in unl[0]

    cfg3d = _cfg(synthetic, mode="3d", patch_size=[8, 8, 4], patches_per_volume=2)
    patches = build_training_dataset(dl.train, cfg3d, train=True, classes=dl.classes)
    assert len(patches) == 6 and patches[5]["image"].shape == (1, 8, 8, 4)
    volumes = build_training_dataset(dl.train, cfg3d, train=False, classes=dl.classes)
    shape = tuple(volumes[0]["image"].shape)
    assert len(volumes) == 3 and shape[0] == 1 and shape[3] == 6 and 8 <= shape[1] <= 9  # resampled to 1.6 mm
    assert hasattr(volumes[0]["image"], "affine")  # whole MetaTensor volumes for sliding windows

    with pytest.raises(ConfigError, match="square in-plane patch"):
        build_training_dataset(dl.train, _cfg(synthetic, mode="3d", patch_size=[8, 4, 4]), train=True)


def test_quarter_turns_of_non_square_slices_are_refused_before_training(synthetic: Path) -> None:
    # Sagittal slices of these volumes are 16 x 6: odd quarter turns would make 6 x 16 ones,
    # and a batch mixing the two fails at a random iteration.
    def cfg(axis: int, **augment: bool) -> object:
        raw = {
            "task": "segmentation",
            "data": {"path": str(synthetic), "val_fraction": 0.0},
            "input": {"mode": "2d", "axis": axis},
            "augment": augment,
        }
        return parse_config(raw)

    dl = build_datalist(cfg(0).data, seed=0)
    with pytest.raises(ConfigError, match=r"augment.rotate90 .* 16x6"):
        build_training_dataset(dl.train, cfg(0), train=True, classes=dl.classes)
    assert (
        len(build_training_dataset(dl.train, cfg(0, rotate90=False), train=True, classes=dl.classes))
        == 3 * 16
    )
    assert len(build_training_dataset(dl.train, cfg(2), train=True, classes=dl.classes)) == 3 * 6
    # The loader's own batch size decides: one slice per batch mixes no shapes, but an
    # unlabelled batch of 4 beside a labelled batch of 1 does.
    one = parse_config({**cfg(0).model_dump(), "train": {"batch_size": 1}})
    assert len(build_training_dataset(dl.train, one, train=True, classes=dl.classes)) == 3 * 16
    with pytest.raises(ConfigError, match=r"tcsm.unlabeled_batch_size: 1"):
        build_training_dataset(dl.train, one, train=True, classes=dl.classes, batch_size=4)


def test_2d_images_only_take_2d_mode(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "d" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 10), 120, np.uint8)).save(tmp_path / "d" / "images" / f"{name}.png")
        mask = np.zeros((12, 10), np.uint8)
        mask[3:6, 3:6] = 1
        Image.fromarray(mask).save(tmp_path / "d" / "masks" / f"{name}.png")
    cfg = parse_config(
        {
            "task": "segmentation",
            "data": {"path": str(tmp_path / "d"), "val_fraction": 0.0},
            "preprocess": {"modality": "image", "slice_size": [8, 8]},
            "input": {"mode": "2d"},
        }
    )
    dl = build_datalist(cfg.data, seed=0)
    ds = build_training_dataset(dl.train, cfg, train=True, classes=dl.classes)
    assert len(ds) == 2 and ds[0]["image"].shape == (1, 8, 8) and int(ds[0]["label"].max()) == 1
    with pytest.raises(ConfigError, match="2D images"):
        cfg.input.mode = "2.5d"
        build_training_dataset(dl.train, cfg, train=True)


def test_a_datalist_mixing_images_and_volumes_names_one_of_each() -> None:
    from fewlabel.data.slices import records_spatial_dims
    from fewlabel.errors import DataError

    assert records_spatial_dims([{"image": "a.png"}, {"image": "b.jpg"}]) == 2
    assert records_spatial_dims([{"image": "a.nii.gz"}]) == 3
    mixed = [{"image": "scans/a.nii.gz"}, {"image": "slices/b.png"}, {"image": "slices/c.png"}]
    with pytest.raises(
        DataError, match=r"2D images \(e.g. slices/b.png\) and 3D volumes \(e.g. scans/a.nii.gz\)"
    ):
        records_spatial_dims(mixed)


def test_foreground_draws_are_judged_at_the_size_the_network_sees() -> None:
    image = torch.rand(1, 64, 64, 3)
    label = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    label[0, 31, 31, 1] = 1  # one pixel: gone once the slice is shrunk to 16 x 16
    label[0, 8:40, 8:40, 2] = 1  # a lesion that survives the shrinking
    ds = SliceDataset(
        [{"image": image, "label": label}], mode="2d", axis=2, slice_size=(16, 16), foreground_ratio=1.0
    )
    assert ds.foreground == [2]
    assert all(ds[i]["label"].sum() > 0 for i in range(len(ds)))
