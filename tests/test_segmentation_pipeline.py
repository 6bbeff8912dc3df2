"""Segmentation pipeline end to end: train (supervised and TCSM), evaluate, predict, resume, demo config."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from _factories import load_script
from fewlabel import __version__
from fewlabel.cli import main
from fewlabel.config import load_config, parse_config
from fewlabel.data.readers import read_label
from fewlabel.data.synthetic_ct import make_synthetic_ct
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.errors import CheckpointError, ConfigError, DataError
from fewlabel.pipelines import segmentation
from fewlabel.pipelines.mask_evaluation import evaluate_masks
from fewlabel.pipelines.segmentation_demo import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo_segmentation.yaml"

# Tiny and fast: 32x32x8 volumes, a 2.5D BasicUNet with a handful of channels, a few iterations,
# one thread (a net this small gains nothing from more, and loses a lot on a busy machine).
FAST = [
    "run.num_threads=1",
    "model.features=[4,4,8,8,16,4]",
    "train.max_epochs=2",
    "train.iterations_per_epoch=3",
    "train.batch_size=4",
    "train.val_every=1",
    "tcsm.unlabeled_batch_size=4",
    "data.labeled_count=null",
]


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synct") / "data"
    return make_synthetic_ct(root, n_labeled=6, n_unlabeled=2, shape=(32, 32, 8), seed=1)


def _train(msd: Path, out: Path, name: str, *extra: str) -> Path:
    args = ["train", str(DEMO_YAML), "--output-dir", str(out)]
    for item in [f"data.path={msd}", f"run.name={name}", *FAST, *extra]:
        args += ["--set", item]
    assert main(args) == 0
    return out / name


def test_supervised_train_then_evaluate_and_predict(msd, tmp_path):
    run = _train(
        msd,
        tmp_path,
        "sup",
        "tcsm.enabled=false",
        "train.checkpoint.every_n_iterations=2",
        "train.checkpoint.keep_last=2",
    )

    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    for name in (
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "history.csv",
        "learning_curves.png",
        "eval/summary.json",
        "eval/report.html",
        "eval/metrics_per_case.csv",
    ):
        assert (run / name).is_file(), name
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    meta = best["meta"]
    assert meta["task"] == "segmentation"
    assert meta["classes"] == ["background", "lesion"]
    assert (meta["spatial_dims"], meta["in_channels"], meta["model_name"]) == (3, 3, "student")
    assert meta["best_metric"] == "mean_fg_dice" and 0.0 <= meta["best_value"] <= 1.0
    assert meta["config"]["tcsm"]["enabled"] is False
    assert meta["software"]["MONAI"] and meta["software"]["Pytorch"] == torch.__version__
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["engine"]["iteration"] == 6 and "optimizer" in last and "rng_state" in last
    # Saved at iterations 2, 3 (epoch end), 4 and 6; keep_last=2 keeps the newest two states.
    kept = sorted(p.name for p in (run / "checkpoints").glob("last*.pt"))
    assert kept == ["last-000000004.pt", "last-000000006.pt", "last.pt"]
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,iteration,train_loss") and len(history) == 3

    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 1  # 6 cases, 20% test -> one patient
    case = summary["metric_per_case"][0]["case"]
    assert 0.0 <= summary["metric_per_case"][0]["uncertainty"] <= 1.0
    assert (run / "eval" / "predictions" / f"{case}.nii.gz").is_file()

    # predict: a mask on the source grid, refused a second time without --overwrite.
    study = msd / "imagesTr" / f"{case}.nii.gz"
    out = tmp_path / "pred"
    ckpt = str(run / "checkpoints" / "best.pt")
    assert main(["predict", "--checkpoint", ckpt, str(study), "--output", str(out)]) == 0
    source, mask = nib.load(study), nib.load(out / f"{case}.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert "lesion_ml" in (out / "predictions.csv").read_text()
    assert main(["predict", "--checkpoint", ckpt, str(study), "--output", str(out)]) == 2
    assert main(["predict", "--checkpoint", ckpt, str(study), "--output", str(out), "--overwrite"]) == 0

    # evaluate on every labelled study of the dataset.
    report_dir = tmp_path / "eval_all"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                ckpt,
                "--data",
                str(msd),
                "--split",
                "all",
                "--output",
                str(report_dir),
            ]
        )
        == 0
    )
    assert len(json.loads((report_dir / "summary.json").read_text())["metric_per_case"]) == 6
    assert (
        main(["evaluate", "--checkpoint", ckpt, "--output", str(report_dir)]) == 2
    )  # exists, no --overwrite
    # Without --data: the checkpoint's own dataset and its held-out test patient.
    assert main(["evaluate", "--checkpoint", ckpt, "--output", str(report_dir), "--overwrite"]) == 0
    saved = (report_dir / "summary.json").read_text()
    assert [c["case"] for c in json.loads(saved)["metric_per_case"]] == [case]
    # The report names its masks where they end up, not in the folder it was built in.
    assert json.loads(saved)["metric_per_case"][0]["prediction_file"] == str(
        report_dir / "predictions" / f"{case}.nii.gz"
    )
    # A case failing half-way (a label value the model does not know) leaves the old report whole.
    broken = tmp_path / "broken"
    shutil.copytree(msd, broken)
    last = sorted((broken / "labelsTr").glob("*.nii.gz"))[-1]
    label = nib.load(last)
    nib.save(nib.Nifti1Image(np.full(label.shape, 7, np.uint8), label.affine), last)
    args = ["evaluate", "--checkpoint", ckpt, "--data", str(broken), "--split", "all"]
    assert main([*args, "--output", str(report_dir), "--overwrite"]) == 2
    assert (report_dir / "summary.json").read_text() == saved
    # A dataset whose dataset.json names its labels otherwise is refused, not scored swapped.
    renamed = tmp_path / "renamed"
    shutil.copytree(msd, renamed)
    meta = json.loads((renamed / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "tumour"}
    (renamed / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match=r"dataset.json labels \['background', 'tumour'\] differ from the model's"
    ):
        segmentation.evaluate(Path(ckpt), str(renamed), tmp_path / "eval_renamed", split="all")
    assert not (tmp_path / "eval_renamed").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # A model whose data.test_path holds studies named like its training ones: --split all would
    # write two masks under one name; and no report goes inside the test data.
    stored = load_checkpoint(Path(ckpt))
    stored["meta"]["config"]["data"]["test_path"] = str(broken)
    with_test = save_checkpoint(stored, tmp_path / "with_test.pt")
    with pytest.raises(
        DataError, match=r"--split all: cases .* are named alike in data.path and data.test_path"
    ):
        segmentation.evaluate(with_test, None, tmp_path / "eval_dup", split="all")
    with pytest.raises(DataError, match="refusing to write into the input folder"):
        segmentation.evaluate(with_test, None, broken / "labelsTr" / "report", split="test")
    assert not (broken / "labelsTr" / "report").exists()
    # Evaluation settings can change after training (test-time augmentation); training settings cannot.
    tta_dir = tmp_path / "eval_tta"
    assert main(["evaluate", "--checkpoint", ckpt, "--output", str(tta_dir), "--set", "eval.tta=true"]) == 0
    context = json.loads((tta_dir / "summary.json").read_text())["context"]
    assert context["model"].endswith("(student, mean of 8 in-plane turns and flips)")
    assert (
        main(["evaluate", "--checkpoint", ckpt, "--output", str(tmp_path / "x"), "--set", "train.lr=1"]) == 2
    )
    assert not (tmp_path / "x").exists()


def test_checkpoint_from_another_release_names_both_versions(msd, tmp_path, capsys):
    run = _train(msd, tmp_path, "ver", "tcsm.enabled=false", "train.max_epochs=1")
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ckpt["meta"]["fewlabel_version"] == __version__
    # A release that had a config key this one lacks wrote this checkpoint.
    ckpt["meta"]["fewlabel_version"] = "0.0.1"
    ckpt["meta"]["config"]["data"]["retired_option"] = False
    old = tmp_path / "old.pt"
    save_checkpoint(ckpt, old)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(old), "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "data.retired_option: unknown key" in err
    assert f"written by fewlabel 0.0.1; this is fewlabel {__version__}" in err
    assert not (tmp_path / "e").exists()


def test_tcsm_train_keeps_teacher_state_and_better_model(msd, tmp_path):
    run = _train(msd, tmp_path, "tcsm", "tcsm.enabled=true", "data.labeled_count=2")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"student", "teacher", "optimizer"} <= set(last["trainer"])
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["meta"]["model_name"] in ("student", "teacher")
    history = (run / "history.csv").read_text()
    for column in ("cons_loss", "cons_weight", "val_dice_student", "val_dice_teacher"):
        assert column in history
    # the column order the docs give
    assert history.startswith("epoch,iteration,train_loss,sup_loss,cons_loss,cons_weight,lr,seconds,")
    assert (run / "eval" / "report.html").is_file()


def test_tcsm_pseudo_label_consistency_records_the_counted_share(msd, tmp_path):
    run = _train(
        msd, tmp_path, "tcsm-ce", "tcsm.enabled=true", "data.labeled_count=2", "tcsm.consistency_loss=ce"
    )
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert list(rows[0])[:7] == [
        "epoch", "iteration", "train_loss", "sup_loss", "cons_loss", "cons_weight", "cons_counted"
    ]  # fmt: skip
    assert all(0.0 <= float(r["cons_counted"]) <= 1.0 for r in rows)


@pytest.mark.parametrize(
    ("method", "cpu_amp", "expected"),
    [
        (["tcsm.enabled=false"], "true", torch.bfloat16),
        (["tcsm.enabled=true", "data.labeled_count=2"], "true", torch.bfloat16),
        (["tcsm.enabled=false"], "false", torch.float32),
    ],
    ids=["supervised", "tcsm", "off"],
)
def test_cpu_amp_trains_in_bfloat16_and_saves_float32(msd, tmp_path, method, cpu_amp, expected):
    seen: list[torch.dtype] = []

    def hook(module: nn.Module, args, out) -> None:
        # Training-mode convolutions only: the teacher and validation run in eval mode, in float32.
        if isinstance(module, nn.Conv2d) and module.training:
            seen.append(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run = _train(msd, tmp_path, "amp", *method, f"train.cpu_amp={cpu_amp}", "train.max_epochs=1")
    finally:
        handle.remove()
    assert seen and set(seen) == {expected}
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert all(v.dtype == torch.float32 for v in best["model"].values() if v.is_floating_point())
    assert not any(k.startswith("net.") for k in best["model"])
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


@pytest.mark.parametrize(
    "method",
    [["tcsm.enabled=false"], ["tcsm.enabled=true", "data.labeled_count=2", "tcsm.ema_warmup_iterations=4"]],
    ids=["supervised", "tcsm"],
)
def test_resume_continues_exactly_where_the_run_stopped(msd, tmp_path, method, capsys):
    extra = [*method, "train.scheduler=none", "train.val_every=2"]
    straight = _train(msd, tmp_path, "straight", *extra)
    # The same run, stopped after its first epoch, then resumed for the second.
    first = _train(msd, tmp_path, "resumed", *extra, "train.max_epochs=1")
    config = yaml.safe_load((first / "config.yaml").read_text())
    # Another seed would split the data anew: resuming under it is refused, and nothing runs.
    before = (first / "checkpoints" / "last.pt").read_bytes()
    edited = {**config, "run": {**config["run"], "seed": 5}, "train": {**config["train"], "lr": 0.5}}
    (first / "config.yaml").write_text(yaml.safe_dump(edited))
    assert main(["train", "--resume", str(first)]) == 2
    err = capsys.readouterr().err
    assert "differs from the config" in err and "run.seed" in err and "train.lr" in err
    assert (first / "checkpoints" / "last.pt").read_bytes() == before
    # Training for longer is allowed (with scheduler none the run then matches the straight one).
    config["train"]["max_epochs"] = 2
    (first / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(first)]) == 0

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(first / "checkpoints" / "last.pt")
    networks = [(a["model"], b["model"])]
    if "trainer" in a:  # TCSM: the teacher (EMA warm-up position included) must match too
        networks.append((a["trainer"]["teacher"], b["trainer"]["teacher"]))
    for x, y in networks:
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=key)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(msd, tmp_path, caplog):
    run = _train(msd, tmp_path, "early", "tcsm.enabled=false")
    for path in (run / "checkpoints").iterdir():  # as after a Ctrl-C during the first epoch
        path.unlink()
    (run / "history.csv").unlink()
    with caplog.at_level("INFO"):
        assert main(["train", "--resume", str(run)]) == 0
    assert "nothing to resume from, training from the start" in caplog.text
    assert f"report {run / 'eval' / 'report.html'}" in caplog.text  # where it is, not where it was built
    assert (run / "checkpoints" / "best.pt").is_file() and len(
        (run / "history.csv").read_text().splitlines()
    ) == 3


class ThresholdNet(nn.Module):
    """Class 1 where the centre input channel exceeds a threshold (a network with known output).

    A small ``slope`` gives soft probabilities instead, so that two such networks disagree.
    """

    def __init__(self, threshold: float, slope: float = 100.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2]
        return torch.stack([torch.zeros_like(centre), self.slope * (centre - self.threshold)], dim=1)


def _model(raw: dict, net: nn.Module, spatial_dims: int) -> segmentation.LoadedModel:
    cfg = parse_config({"task": "segmentation", "data": {"path": "unused"}, **raw})
    meta = {"classes": ["background", "lesion"], "spatial_dims": spatial_dims, "model_name": "student"}
    return segmentation.LoadedModel(net, cfg, meta, torch.device("cpu"), Path("model.pt"))


def test_prediction_overlays_a_reoriented_cropped_study_voxel_for_voxel(tmp_path):
    rng = np.random.default_rng(0)
    hu = np.full((20, 9, 13), -1000, dtype=np.int16)  # air border: cropped away in preprocessing
    hu[3:17, 2:8, 1:12] = rng.choice([-800, 100], size=(14, 6, 11))
    # Axes permuted and flipped (not RAS), anisotropic, off-origin.
    affine = np.array([[0.0, 0.0, -2.5, 30.0], [-0.7, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -40.0], [0, 0, 0, 1]])
    study = tmp_path / "in" / "case.nii.gz"
    study.parent.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), study)

    # Window [-1000, 400]: -800 HU -> 0.14, 100 HU -> 0.79; the net marks values above 0.5.
    raw = {
        "preprocess": {"orientation": "RAS", "crop_foreground": True},
        "input": {"mode": "2.5d", "slab": 3, "axis": 2},
        "train": {"batch_size": 1},  # cropped slices keep their own size
    }
    labels, probs, reference = segmentation.predict_study(_model(raw, ThresholdNet(0.5), 3), study)
    assert labels.shape == hu.shape and probs.shape == (2, *hu.shape)
    np.testing.assert_array_equal(labels, (hu > 0).astype(np.uint8))
    np.testing.assert_allclose(reference.affine, affine)


@pytest.mark.parametrize(
    "mode", [{"mode": "2.5d", "slab": 3, "axis": 2}, {"mode": "3d", "patch_size": [16, 16, 16]}], ids=str
)
def test_a_study_with_nothing_to_crop_to_is_predicted_whole(tmp_path, mode):
    # All air: the foreground crop selects nothing, and an empty crop would stop the network.
    study = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 9, 6), -1000, dtype=np.int16), np.eye(4)), study)
    raw = {
        "preprocess": {"crop_foreground": True, "slice_size": [16, 16]},
        "input": mode,
        "train": {"batch_size": 2},
    }
    labels, probs, _ = segmentation.predict_study(_model(raw, ThresholdNet(0.5), 3), study)
    assert labels.shape == (20, 9, 6) and not labels.any()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_prediction_with_resampling_keeps_source_grid(tmp_path):
    hu = np.full((15, 11, 6), -900, dtype=np.int16)
    hu[4:11, 3:8, 1:5] = 50
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [5, -3, 7]
    (tmp_path / "in").mkdir()
    study = tmp_path / "in" / "vol.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), study)
    raw = {"preprocess": {"spacing": [1.2, 1.2, 1.5]}, "input": {"mode": "3d", "patch_size": [16, 16, 16]}}
    labels, _, _ = segmentation.predict_study(_model(raw, ThresholdNet(0.5), 3), study)
    assert labels.shape == hu.shape
    # Bilinear resampling blurs edges by a voxel at most; the core of the block survives.
    assert labels[6:9, 4:7, 2:4].all() and not labels[0].any()


def test_2d_image_prediction_is_a_png_of_the_same_size(tmp_path):
    pixels = np.zeros((21, 34), dtype=np.uint8)
    pixels[5:15, 10:30] = 200
    image = tmp_path / "in" / "slice.png"
    image.parent.mkdir()
    Image.fromarray(pixels).save(image)
    raw = {"preprocess": {"modality": "image", "slice_size": None}, "input": {"mode": "2d"}}
    model = _model(raw, ThresholdNet(0.5), 2)
    labels, _, reference = segmentation.predict_study(model, image)
    np.testing.assert_array_equal(labels, (pixels > 128).astype(np.uint8))
    assert reference.array.shape == (21, 34)

    # A volume given to a 2D model is refused, naming the file.
    volume = tmp_path / "in" / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), volume)
    with pytest.raises(DataError, match="vol.nii.gz"):
        segmentation.predict_study(model, volume)


def test_collect_studies_expands_folders_and_lists(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii", "c.png"):
        (folder / name).write_bytes(b"x")
    (folder / "notes.md").write_text("ignored")
    listing = tmp_path / "list.txt"
    listing.write_text("studies/a.nii\n# a comment\n\nstudies/c.png\n")
    assert [p.name for p in segmentation.collect_studies([folder])] == ["a.nii", "b.nii.gz", "c.png"]
    assert [p.name for p in segmentation.collect_studies([listing])] == ["a.nii", "c.png"]
    assert segmentation.case_name(folder / "b.nii.gz") == "b"
    with pytest.raises(DataError, match="not found"):
        segmentation.collect_studies([tmp_path / "missing.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        segmentation.collect_studies([tmp_path / "empty"])
    (tmp_path / "latin1.txt").write_bytes("studies/a\xe9.nii\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt.*not a UTF-8 text list"):
        segmentation.collect_studies([tmp_path / "latin1.txt"])
    (folder / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(DataError, match=r"IM0001.dcm: is one DICOM file; give the folder .*studies\)"):
        segmentation.collect_studies([folder / "IM0001.dcm"])


def test_input_mode_must_fit_the_data():
    cfg = parse_config({"task": "segmentation", "data": {"path": "x"}, "input": {"mode": "2.5d"}})
    with pytest.raises(ConfigError, match="2D images"):
        segmentation.check_input_mode(cfg, 2)
    cfg = parse_config(
        {"task": "segmentation", "data": {"path": "x"}, "input": {"mode": "3d", "patch_size": [24, 24, 8]}}
    )
    with pytest.raises(ConfigError, match="multiple of 16"):
        segmentation.check_input_mode(cfg, 3)
    cfg = parse_config(
        {"task": "segmentation", "data": {"path": "x"}, "input": {"mode": "3d", "patch_size": [16, 16, 16]}}
    )
    with pytest.raises(ConfigError, match="16x16x16.*deepest level.*input.patch_size"):
        segmentation.check_input_mode(cfg, 3)


def test_slices_too_small_for_the_network_are_refused_naming_the_study():
    from monai.data import MetaTensor

    from fewlabel.data.slices import SliceDataset

    cfg = parse_config({"task": "segmentation", "data": {"path": "x"}})
    big = MetaTensor(torch.zeros(1, 48, 48, 4), meta={"filename_or_obj": "big.nii.gz"})
    small = MetaTensor(torch.zeros(1, 20, 20, 4), meta={"filename_or_obj": "small.nii.gz"})
    other = MetaTensor(torch.zeros(1, 40, 40, 4), meta={"filename_or_obj": "other.nii.gz"})
    segmentation._check_slice_sizes(SliceDataset([{"image": big}], labeled=False), [], cfg, 8)
    with pytest.raises(ConfigError, match="small.nii.gz are 20x20.*preprocess.slice_size"):
        segmentation._check_slice_sizes(
            SliceDataset([{"image": big}, {"image": small}], labeled=False), [], cfg, 8
        )
    # Resized slices are what the network sees, whatever the studies' own size.
    resized = SliceDataset([{"image": small}], labeled=False, slice_size=(32, 32))
    segmentation._check_slice_sizes(resized, [], cfg, 8)
    # Slices of several sizes cannot share a batch (one at a time can).
    mixed = SliceDataset([{"image": big}, {"image": other}], labeled=False)
    with pytest.raises(
        ConfigError, match=r"differ in size: 48x48 \(big.nii.gz\), 40x40 \(other.nii.gz\).*\[48, 48\]"
    ):
        segmentation._check_slice_sizes(mixed, [], cfg, 8)
    segmentation._check_slice_sizes(mixed, [], cfg, 1)


def test_2d_images_of_several_sizes_are_found_from_their_headers(tmp_path):
    from fewlabel.data.slices import SliceDataset

    cfg = parse_config({"task": "segmentation", "data": {"path": "x"}, "input": {"mode": "2d"}})
    records = []
    for name, size in (("a.png", (64, 48)), ("b.png", (64, 48)), ("c.png", (40, 64))):
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / name)
        records.append({"image": str(tmp_path / name)})
    # 2D images are read on access: nothing is decoded to find their sizes.
    dataset = SliceDataset([{"image": torch.zeros(1, 64, 48)}] * 3, labeled=False, single_slice=True)
    with pytest.raises(ConfigError, match=r"64x48 \(.*a.png\), 40x64 \(.*c.png\)"):
        segmentation._check_slice_sizes(dataset, records, cfg, 4)


def test_shipped_configs_validate_and_the_demo_yaml_matches_the_demo():
    for name in ("ct_supervised", "ct_tcsm", "covid2d_supervised", "lidc3d_supervised", "demo_segmentation"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.task == "segmentation"
    shipped = load_config(DEMO_YAML).model_dump()
    demo = parse_config(DEMO_CONFIG).model_dump()
    assert shipped == demo


def test_evaluate_masks_entry_point_scores_masks_on_disk(tmp_path):
    gt = np.zeros((8, 8), dtype=np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros_like(gt)
    pred[2:6, 2:4] = 1  # half of the truth: Dice = 2*8 / (8 + 16)
    for folder, mask in (("pred", pred), ("gt", gt)):
        (tmp_path / folder).mkdir()
        Image.fromarray(mask).save(tmp_path / folder / "case.png")
    result = segmentation.evaluate_masks(
        tmp_path / "pred", tmp_path / "gt", tmp_path / "out", classes=["bg", "lesion"]
    )
    assert Path(result["report"]).is_file()
    assert read_label(tmp_path / "pred" / "case.png", ["bg", "lesion"]).array.sum() == 8
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric_per_case"][0]["metrics"]["1"]["Dice"] == pytest.approx(2 / 3)


def _write_ct_series(folder: Path, hu: np.ndarray) -> None:
    """A DICOM CT series (one file per axial slice) holding ``hu`` indexed (row, column, slice)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series, k + 1
        ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.9]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = hu.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = (hu[:, :, k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)  # no suffix, as scanners write them


def test_dicom_series_folder_is_predicted_onto_its_own_grid(tmp_path, monkeypatch):
    from fewlabel.data.readers import read_dicom_series
    from fewlabel.pipelines import segmentation_predict

    rng = np.random.default_rng(3)
    hu = rng.choice([-800, 100], size=(12, 10, 4)).astype(np.int16)
    series = tmp_path / "inputs" / "chest"
    _write_ct_series(series, hu)
    raw = {"preprocess": {"orientation": "RAS"}, "input": {"mode": "2.5d", "slab": 3, "axis": 2}}
    model = _model(raw, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)

    out = segmentation.predict(tmp_path / "model.pt", [tmp_path / "inputs"], tmp_path / "pred")
    source = read_dicom_series(series)
    mask = nib.load(out / "chest.nii.gz")
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (source.array > 0).astype(np.uint8))
    assert (source.array > 0).sum() == (hu > 0).sum()  # the same voxels, whatever the axis order

    with pytest.raises(DataError, match="input folder"):
        segmentation.predict(tmp_path / "model.pt", [series], series / "out")


def test_nested_dicom_exports_are_found_and_named_by_their_path(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from fewlabel.pipelines import segmentation_predict

    hu = np.full((6, 5, 3), -800, dtype=np.int16)
    hu[2:4, 1:3, :] = 100
    exports = tmp_path / "exports"
    for patient in ("P002", "P001"):
        _write_ct_series(exports / patient / "20240101" / "CT", hu)
    _write_ct_series(exports / ".trash" / "CT", hu)  # hidden: tool state, not a study
    (exports / "P001" / "20240101" / "loop").symlink_to(exports, target_is_directory=True)
    # The index of a PACS export or CD claims DICOM too, but holds no slices.
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.save_as(exports / "DICOMDIR", enforce_file_format=True)

    assert [p.relative_to(exports).as_posix() for p in segmentation.collect_studies([exports])] == [
        "P001/20240101/CT",
        "P002/20240101/CT",
    ]
    model = _model({"preprocess": {"orientation": "RAS"}}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    out = segmentation.predict(tmp_path / "model.pt", [exports], tmp_path / "pred")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "P001_20240101_CT.nii.gz",
        "P002_20240101_CT.nii.gz",
    ]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["P001_20240101_CT", "P002_20240101_CT"]
    # A series given directly keeps its folder's name.
    assert segmentation.case_name(exports / "P001" / "20240101" / "CT") == "CT"

    with pytest.raises(DataError, match="input folder"):
        segmentation.predict(tmp_path / "model.pt", [exports], exports / "pred")
    (tmp_path / "empty" / "sub" / "deeper").mkdir(parents=True)
    with pytest.raises(DataError, match="no DICOM series in any of its subfolders"):
        segmentation.collect_studies([tmp_path / "empty"])


def test_segmentation_demo_wiring(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_demo as demo

    # The real demo takes well under a minute; the wiring is the same at a fraction of the size.
    monkeypatch.setitem(demo.DEMO_DATA, "shape", (32, 32, 8))
    for section, changes in {
        "run": {"num_threads": 1},
        "model": {"features": [4, 4, 8, 8, 16, 4]},
        "train": {"max_epochs": 1, "iterations_per_epoch": 2, "batch_size": 4, "val_every": 1},
        "tcsm": {"unlabeled_batch_size": 4},
    }.items():
        monkeypatch.setitem(demo.DEMO_CONFIG, section, {**demo.DEMO_CONFIG[section], **changes})
    out = tmp_path / "demo" / "segmentation"
    for _ in range(2):  # a second run replaces the demo's own folders
        report = demo.run_segmentation_demo(out)
        assert report == out / "run" / "eval" / "report.html" and report.is_file()
        assert json.loads((out / "run" / "status.json").read_text())["state"] == "completed"
        assert load_checkpoint(out / "run" / "checkpoints" / "best.pt")["meta"]["config"]["tcsm"]["enabled"]
        assert [p.name for p in (out / "predictions").glob("*.nii.gz")] == ["synct_000.nii.gz"]


@pytest.mark.realdata
def test_covid_config_reads_the_real_dataset(shared_data):
    from fewlabel.data.segmentation import build_datalist

    root = shared_data / "covid_semiseg"
    cfg = load_config(
        REPO / "configs" / "covid2d_supervised.yaml",
        [
            f"data.path={root / 'train'}",
            f"data.test_path={root / 'test'}",
            f"data.unlabeled_path={root / 'unlabeled' / 'images'}",
        ],
    )
    datalist = build_datalist(cfg.data, cfg.run.seed)
    assert datalist.classes == ["background", "ggo", "consolidation"]
    assert (len(datalist.train) + len(datalist.val), len(datalist.val), len(datalist.test)) == (50, 10, 48)
    assert len(datalist.unlabeled) == 1600


@pytest.mark.realdata
def test_lidc_datalist_script_lists_every_crop_by_patient(shared_data, tmp_path):
    script = load_script("make_lidc_datalist")
    out = tmp_path / "lidc.csv"
    assert script.main([str(shared_data / "lidc_voi"), str(out)]) == 0
    cfg = load_config(REPO / "configs" / "lidc3d_supervised.yaml", [f"data.path={out}"])
    from fewlabel.data.segmentation import build_datalist

    datalist = build_datalist(cfg.data, cfg.run.seed)
    labelled = datalist.train + datalist.val + datalist.test
    assert len(labelled) == 992  # two crops have no mask and are listed as unlabelled
    patients = [{r["patient_id"] for r in part} for part in (datalist.train, datalist.val, datalist.test)]
    assert (
        not (patients[0] & patients[1])
        and not (patients[0] & patients[2])
        and not (patients[1] & patients[2])
    )
    with pytest.raises(SystemExit, match="exists already"):
        script.main([str(shared_data / "lidc_voi"), str(out)])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_demoted_share_decides_where_unlabelled_batches_come_from(msd, share):
    from fewlabel.data.segmentation import build_datalist

    cfg = load_config(
        DEMO_YAML,
        [
            f"data.path={msd}",
            *FAST,
            "tcsm.enabled=true",
            "data.labeled_count=2",
            f"tcsm.demoted_share={share}",
        ],
    )
    datalist = build_datalist(cfg.data, cfg.run.seed)
    demoted = {r["id"] for r in datalist.unlabeled[: datalist.demoted]}
    assert len(demoted) == datalist.demoted == 2 and len(datalist.unlabeled) == 4  # + 2 unlabelled volumes
    loader = segmentation._loader(
        datalist.unlabeled, cfg, datalist.classes, False, 4, 5, demoted=datalist.demoted
    )
    ids = [i for batch in loader for i in batch["id"]]
    assert len(ids) == 20
    assert all((i in demoted) == bool(share) for i in ids)


def test_demoted_share_without_set_aside_cases_stops_before_training(msd, tmp_path, capsys):
    args = ["train", str(DEMO_YAML), "--output-dir", str(tmp_path)]
    for item in [f"data.path={msd}", "run.name=share", *FAST, "tcsm.enabled=true", "tcsm.demoted_share=0.5"]:
        args += ["--set", item]
    assert main(args) != 0
    assert re.search(
        r"tcsm.demoted_share=0.5: .*0 set-aside training cases, 2 unlabelled", capsys.readouterr().err
    )
    checkpoints = tmp_path / "share" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_evaluation_refuses_a_label_on_another_grid(tmp_path):
    hu = np.full((8, 8, 6), -1000, dtype=np.int16)
    hu[2:6, 2:6, 1:5] = 300
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted = affine.copy()
    shifted[0, 3] = 25.0  # the same shape, 25 mm away
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image((hu > 0).astype(np.uint8), shifted), tmp_path / "label.nii.gz")
    model = _model({"preprocess": {"orientation": "RAS"}, "input": {"mode": "2d"}}, ThresholdNet(0.5), 3)
    record = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz"), "id": "c"}
    with pytest.raises(DataError, match="label.nii.gz.*affine differs"):
        segmentation.evaluate_studies(model, [record], tmp_path / "report")


def test_mask_and_model_evaluation_take_slice_dice_over_the_same_axial_slices(tmp_path):
    # Array axis 0 runs inferior-superior; the two evaluations must slice it alike.
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    gt = np.zeros((6, 8, 8), np.uint8)
    gt[1:5, 2:6, 2:6] = 1
    pred = gt.copy()
    pred[1, 2:6, 2:6] = 0
    pred[1, 2, 2] = 1  # one axial slice nearly missed
    for name, mask in (("gt", gt), ("pred", pred)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / name / "c.nii.gz")
    nib.save(
        nib.Nifti1Image(np.where(pred > 0, 300, -1000).astype(np.int16), affine), tmp_path / "image.nii.gz"
    )
    by_masks = evaluate_masks(tmp_path / "pred", tmp_path / "gt", tmp_path / "masks-report")
    model = _model(
        {"preprocess": {"orientation": "RAS"}, "input": {"mode": "2d", "axis": 2}}, ThresholdNet(0.5), 3
    )
    record = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "gt" / "c.nii.gz"), "id": "c"}
    by_model = segmentation.evaluate_studies(model, [record], tmp_path / "model-report")
    dice = [r["summary"]["metrics"]["dice"][1]["mean"] for r in (by_masks, by_model)]
    # Axial slices 1-4 score 2/17, 1, 1, 1; sliced along another axis the mean would differ.
    assert dice[0] == pytest.approx((2 / 17 + 3) / 4)
    assert dice[1] == pytest.approx(dice[0])


def test_model_selection_prefers_no_false_positives_on_lesion_free_validation():
    # With no foreground in any validation label, a model that predicts none scores NaN
    # (nothing to find, nothing found) and one with false positives scores 0.
    from fewlabel.engines.segmentation import _orderable

    assert _orderable(math.nan) > _orderable(0.0)
    assert _orderable(0.9) < _orderable(math.nan) and _orderable(None) < _orderable(0.0)


def test_an_unreadable_subfolder_is_named_in_the_error(tmp_path, monkeypatch):
    locked = tmp_path / "exports" / "P001"
    locked.mkdir(parents=True)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:  # as for a folder without read permission (root reads them all)
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match="P001.*cannot be searched for DICOM series: Permission denied"):
        segmentation.collect_studies([tmp_path / "exports"])


def test_one_scan_is_predicted_into_a_folder_beside_it_not_into_its_own(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    hu = np.full((6, 5, 4), -800, dtype=np.int16)
    hu[2:4, 1:3, 1:3] = 100
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), scan)
    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)

    out = segmentation.predict(tmp_path / "model.pt", [scan], tmp_path / "preds_scan")
    assert np.asarray(nib.load(out / "scan.nii.gz").dataobj).sum() == 8
    # In the scan's own folder the mask would take the scan's name.
    with pytest.raises(DataError, match="is the folder of an input file"):
        segmentation.predict(tmp_path / "model.pt", [scan], tmp_path, overwrite=True)
    assert np.asarray(nib.load(scan).dataobj).min() == -800


def test_masks_are_never_predicted_onto_a_file_or_into_a_folder_named_like_a_csv(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), dtype=np.int16), np.eye(4)), scan)
    existing = tmp_path / "grades.csv"
    existing.write_text("image,grade\n")
    # Refused before the checkpoint (absent here) is even read.
    with pytest.raises(DataError, match="is a file; a segmentation model writes"):
        segmentation.predict(tmp_path / "model.pt", [scan], existing, overwrite=True)
    assert existing.read_text() == "image,grade\n"
    with pytest.raises(DataError, match=r"into a folder; give a folder such as .*masks$"):
        segmentation.predict(tmp_path / "model.pt", [scan], tmp_path / "masks.csv")
    assert not (tmp_path / "masks.csv").exists()


def _three_scans(tmp_path: Path) -> tuple[Path, np.ndarray]:
    scans = tmp_path / "scans"
    scans.mkdir()
    hu = np.full((6, 5, 4), -800, dtype=np.float32)
    hu[2:4, 1:3, 1:3] = 100
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(hu, np.eye(4)), scans / f"{name}.nii.gz")
    return scans, hu


def test_a_study_failing_midway_leaves_the_finished_ones_listed(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    scans, hu = _three_scans(tmp_path)
    broken = hu.copy()
    broken[0, 0, 0] = np.nan  # opens fine; found only when the voxels are read
    nib.save(nib.Nifti1Image(broken, np.eye(4)), scans / "b.nii.gz")
    out = tmp_path / "out"

    # A study that does not open stops the call before anything is written.
    (tmp_path / "truncated.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes()[:40])
    with pytest.raises(DataError, match="truncated.nii.gz"):
        segmentation.predict(tmp_path / "model.pt", [scans, tmp_path / "truncated.nii.gz"], out)
    assert not out.exists()

    with pytest.raises(DataError, match="b.nii.gz"):
        segmentation.predict(tmp_path / "model.pt", [scans], out)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "predictions.csv"]
    assert [r["case"] for r in csv.DictReader((out / "predictions.csv").open())] == ["a"]
    with pytest.raises(
        DataError, match=r"out: outputs exist already \(a.nii.gz, predictions.csv\); pass --overwrite"
    ):
        segmentation.predict(tmp_path / "model.pt", [scans / "a.nii.gz"], out)

    # Once b is fixed, the rest go into the same folder and the listing covers all three.
    nib.save(nib.Nifti1Image(hu, np.eye(4)), scans / "b.nii.gz")
    segmentation.predict(tmp_path / "model.pt", [scans / "b.nii.gz", scans / "c.nii.gz"], out, overwrite=True)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b", "c"]
    assert {r["lesion_voxels"] for r in rows} == {"8"}
    assert {r["uncertainty"] for r in rows} == {"0.0"}  # a threshold network is never in doubt


def test_a_failed_rerun_with_overwrite_still_lists_the_masks_it_did_not_replace(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    scans, hu = _three_scans(tmp_path)
    out = tmp_path / "out"
    segmentation.predict(tmp_path / "model.pt", [scans], out)
    broken = hu.copy()
    broken[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(broken, np.eye(4)), scans / "b.nii.gz")
    with pytest.raises(DataError, match="b.nii.gz"):
        segmentation.predict(tmp_path / "model.pt", [scans], out, overwrite=True)
    # a was predicted again; b (failed) and c (not reached) keep their earlier masks and rows
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "predictions.csv"]
    assert sorted(r["case"] for r in csv.DictReader((out / "predictions.csv").open())) == ["a", "b", "c"]


def test_an_unexpected_error_midway_still_lists_the_finished_studies(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    real = segmentation_predict.predict_study

    def out_of_memory_on_c(model, path):
        if Path(path).name == "c.nii.gz":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, path)

    monkeypatch.setattr(segmentation_predict, "predict_study", out_of_memory_on_c)
    scans, _ = _three_scans(tmp_path)
    with pytest.raises(torch.OutOfMemoryError):
        segmentation.predict(tmp_path / "model.pt", [scans], tmp_path / "out")
    assert [r["case"] for r in csv.DictReader((tmp_path / "out" / "predictions.csv").open())] == ["a", "b"]


def test_two_cases_that_would_write_the_same_file_are_refused_before_anything_is_written(
    tmp_path, monkeypatch
):
    from fewlabel.pipelines import segmentation_predict

    model = _model({"eval": {"save_probabilities": True}}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    scans, _ = _three_scans(tmp_path)
    (scans / "b.nii.gz").rename(scans / "a_probabilities.nii.gz")  # its mask is a's probability map
    with pytest.raises(
        DataError, match=r"cases 'a' and 'a_probabilities' would both write a_probabilities.nii.gz"
    ):
        segmentation.predict(tmp_path / "model.pt", [scans], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out").exists()


def test_a_study_of_the_wrong_kind_stops_the_call_before_anything_is_predicted(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    scans, _ = _three_scans(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(scans / "z_preview.png")
    with pytest.raises(
        DataError, match="z_preview.png: is one of the 2D images, but the model was trained on 3D"
    ):
        segmentation.predict(tmp_path / "model.pt", [scans], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_study_named_like_a_formula_is_listed_as_text_and_kept_intact_by_overwrite(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({}, ThresholdNet(0.5), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    hu = np.full((6, 5, 4), -800, dtype=np.float32)
    hu[2:4, 1:3, 1:3] = 100
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "=1+1.nii.gz")
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "b.nii.gz")
    out = tmp_path / "out"

    segmentation.predict(tmp_path / "model.pt", [tmp_path / "=1+1.nii.gz"], out)
    assert (out / "predictions.csv").read_text().splitlines()[1].startswith("'=1+1,")
    # A second call keeps the first row as it was: unescaped on reading, escaped once on writing.
    segmentation.predict(tmp_path / "model.pt", [tmp_path / "b.nii.gz"], out, overwrite=True)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["'=1+1", "b"]
    assert rows[0]["mask"] == str(out / "=1+1.nii.gz")  # a path starting with / is no formula
    assert rows[0]["lesion_voxels"] == "8"


def test_probability_maps_share_the_mask_geometry(tmp_path, monkeypatch):
    from fewlabel.pipelines import segmentation_predict

    model = _model({"eval": {"save_probabilities": True}}, ThresholdNet(0.5, slope=2.0), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: model)
    hu = np.full((6, 5, 4), -800, dtype=np.float32)
    hu[2:4, 1:3, 1:3] = 100
    affine = np.array([[0.0, -0.8, 0.0, 10.0], [0.7, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    source = nib.Nifti1Image(hu, affine)
    source.set_sform(affine, code=2)  # aligned to a template, unlike the scanner's qform
    source.set_qform(np.diag([0.8, 0.7, 2.5, 1.0]), code=1)
    nib.save(source, tmp_path / "case.nii.gz")

    segmentation.predict(tmp_path / "model.pt", [tmp_path / "case.nii.gz"], tmp_path / "out")
    mask = nib.load(tmp_path / "out" / "case.nii.gz")
    maps = nib.load(tmp_path / "out" / "case_probabilities.nii.gz")
    assert maps.shape == (6, 5, 4, 2)
    for field in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "qoffset_x"):
        np.testing.assert_array_equal(maps.header[field], mask.header[field], err_msg=field)
    assert int(maps.header["sform_code"]) == 2
    probs = np.asarray(maps.dataobj)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=-1), np.asarray(mask.dataobj))
    # Predicted again without the maps: the old ones do not stay beside the new mask.
    plain = _model({}, ThresholdNet(0.5, slope=2.0), 3)
    monkeypatch.setattr(segmentation_predict, "load_segmentation_model", lambda checkpoint, **_: plain)
    segmentation.predict(tmp_path / "model.pt", [tmp_path / "case.nii.gz"], tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.nii.gz", "predictions.csv"]


def test_labels_with_classes_the_model_lacks_are_named_as_such(tmp_path):
    hu = np.full((6, 5, 4), -800, dtype=np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "image.nii.gz")
    label = np.zeros(hu.shape, np.uint8)
    label[1, 1, 1] = 3
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "label.nii.gz")
    record = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz"), "id": "c"}
    # data.classes is not the user's to change here: the checkpoint fixes the classes.
    with pytest.raises(DataError, match=r"label.nii.gz: label values \[3\].*the model was trained on these"):
        segmentation.evaluate_studies(_model({}, ThresholdNet(0.5), 3), [record], tmp_path / "report")


def test_an_ensemble_averages_its_members_probabilities_on_the_source_grid(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 400, size=(14, 10, 9)).astype(np.int16)
    affine = np.diag([0.7, 0.9, 2.5, 1.0])
    study = tmp_path / "in" / "case.nii.gz"
    study.parent.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), study)
    # Members predict their own way: one slab-wise on reoriented slices, one in 3D on a resampled grid.
    sliced = _model(
        {
            "preprocess": {"orientation": "RAS"},
            "input": {"mode": "2.5d", "slab": 3, "axis": 2},
            "train": {"batch_size": 1},
        },
        ThresholdNet(0.5, slope=4.0),
        3,
    )
    volumetric = _model(
        {"preprocess": {"spacing": [1.2, 1.2, 1.5]}, "input": {"mode": "3d", "patch_size": [16, 16, 16]}},
        ThresholdNet(0.5, slope=-9.0),
        3,
    )
    _, alone_a, _ = segmentation.predict_study(sliced, study)
    _, alone_b, _ = segmentation.predict_study(volumetric, study)
    assert not np.allclose(alone_a, alone_b, atol=0.1)

    labels, probs, reference = segmentation.predict_study(
        segmentation.ModelEnsemble([sliced, volumetric]), study
    )
    assert probs.shape == (2, *hu.shape)
    np.testing.assert_allclose(probs, (alone_a + alone_b) / 2, atol=1e-6)
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    np.testing.assert_allclose(reference.affine, affine)


def test_an_ensemble_refuses_members_of_other_classes_or_studies():
    raw = {"input": {"mode": "2.5d", "slab": 3}}
    first = _model(raw, ThresholdNet(0.5, slope=1.0), 3)
    other = _model(raw, ThresholdNet(0.5, slope=1.0), 3)
    other.classes = ["background", "tumour"]
    other.path = Path("other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt.*tumour.*same classes"):
        segmentation.ModelEnsemble([first, other])
    flat = _model(
        {"preprocess": {"modality": "image"}, "input": {"mode": "2d"}}, ThresholdNet(0.5, slope=1.0), 2
    )
    flat.path = Path("flat.pt")
    with pytest.raises(CheckpointError, match=r"flat\.pt: was trained on 2D images"):
        segmentation.ModelEnsemble([first, flat])


def test_evaluate_and_predict_average_the_checkpoints_given(msd, tmp_path, capsys):
    small = _train(msd, tmp_path, "small", "tcsm.enabled=false")
    wide = _train(msd, tmp_path, "wide", "tcsm.enabled=false", "model.features=[8,8,8,8,16,8]")
    checkpoints = [small / "checkpoints" / "best.pt", wide / "checkpoints" / "best.pt"]
    both = [arg for c in checkpoints for arg in ("--checkpoint", str(c))]

    assert main(["evaluate", *both, "--output", str(tmp_path / "ens")]) == 0
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    report = (tmp_path / "ens" / "report.html").read_text()
    assert "mean of 2 models" in report and "[8, 8, 8, 8, 16, 8]" in report
    # The first run's test split, every case of it.
    single = sorted(p.name for p in (small / "eval" / "predictions").iterdir())
    assert sorted(p.name for p in (tmp_path / "ens" / "predictions").iterdir()) == single
    assert summary["n_cases"] == len(single)
    assert summary["context"]["model"].startswith("mean of 2 models: basicunet [4, 4, 8, 8, 16, 4]")

    # predict writes the arg-max of the members' mean probabilities.
    study = sorted((msd / "imagesTr").glob("*.nii.gz"))[0]
    assert main(["predict", *both, str(study), "--output", str(tmp_path / "pred")]) == 0
    members = [segmentation.load_segmentation_model(c) for c in checkpoints]
    mean = sum(segmentation.predict_study(m, study)[1] for m in members) / 2
    written = np.asarray(nib.load(tmp_path / "pred" / study.name).dataobj)
    np.testing.assert_array_equal(written, mean.argmax(axis=0))

    # A run of another seed split the data differently: it trained on some of the first run's
    # test studies, so scoring the pair on that split is refused, and nothing is written.
    other_seed = _train(msd, tmp_path, "seed7", "tcsm.enabled=false", "run.seed=7")
    capsys.readouterr()
    rc = main(
        [
            "evaluate",
            *both[:2],
            "--checkpoint",
            str(other_seed / "checkpoints" / "best.pt"),
            "--output",
            str(tmp_path / "leak"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert (
        "seed7" in err
        and "was trained (with or without labels) or validated on" in err
        and "test split" in err
    )
    assert not (tmp_path / "leak").exists()
    # --data naming the same dataset re-creates the same split, and is refused the same way.
    leak = [*both[:2], "--checkpoint", str(other_seed / "checkpoints" / "best.pt")]
    assert main(["evaluate", *leak, "--data", str(msd), "--output", str(tmp_path / "leak")]) == 2
    assert "seed7" in capsys.readouterr().err and not (tmp_path / "leak").exists()

    # The same checkpoint twice, or a classification checkpoint beside a segmentation one.
    assert main(["predict", *both[:2], *both[:2], str(study), "--output", str(tmp_path / "twice")]) == 2
    assert "given more than once" in capsys.readouterr().err
    grading = save_checkpoint({"model": {}, "meta": {"task": "classification"}}, tmp_path / "grading.pt")
    assert (
        main(
            [
                "predict",
                *both[:2],
                "--checkpoint",
                str(grading),
                str(study),
                "--output",
                str(tmp_path / "mixed"),
            ]
        )
        == 2
    )
    assert "an ensemble averages models of one task" in capsys.readouterr().err


def test_the_folds_of_a_cross_validation_ensemble_on_their_shared_test_split(msd, tmp_path, capsys):
    runs = [
        _train(msd, tmp_path, f"fold{f}", "tcsm.enabled=false", "data.folds=2", f"data.fold={f}")
        for f in (0, 1)
    ]
    from fewlabel.data.segmentation import build_datalist

    configs = [load_config(run / "config.yaml") for run in runs]
    lists = [build_datalist(cfg.data, cfg.run.seed) for cfg in configs]
    assert lists[0].test == lists[1].test
    val = [{r["id"] for r in dl.val} for dl in lists]
    assert val[0] and val[1] and not val[0] & val[1]
    assert val[1] <= {r["id"] for r in lists[0].train + lists[0].unlabeled}

    both = [arg for run in runs for arg in ("--checkpoint", str(run / "checkpoints" / "best.pt"))]
    assert main(["evaluate", *both, "--output", str(tmp_path / "cv-test")]) == 0
    # Fold 1 trained on fold 0's validation patients.
    capsys.readouterr()
    assert main(["evaluate", *both, "--split", "val", "--output", str(tmp_path / "cv-val")]) == 2
    assert "fold1" in capsys.readouterr().err and not (tmp_path / "cv-val").exists()

    # Other data too small for two folds: its test split cannot be re-created, but all of it
    # can be scored.
    small = make_synthetic_ct(tmp_path / "small", n_labeled=2, n_unlabeled=0, shape=(32, 32, 8), seed=3)
    fold0 = ["--checkpoint", str(runs[0] / "checkpoints" / "best.pt"), "--data", str(small)]
    assert main(["evaluate", *fold0, "--output", str(tmp_path / "small-test")]) == 2
    assert "2-fold cross-validation cannot be re-created here" in capsys.readouterr().err
    assert main(["evaluate", *fold0, "--split", "all", "--output", str(tmp_path / "small-all")]) == 0
    assert json.loads((tmp_path / "small-all" / "summary.json").read_text())["n_cases"] == 2


def test_an_ensemble_member_that_saw_a_test_study_unlabelled_is_refused(msd, tmp_path):
    from fewlabel.data.segmentation import build_datalist

    run = _train(msd, tmp_path, "a", "tcsm.enabled=false")
    first = segmentation.load_segmentation_model(run / "checkpoints" / "best.pt")
    test = build_datalist(first.cfg.data, first.cfg.run.seed).test
    # Another model, trained on other labelled data, had the first one's test study among
    # its unlabelled studies.
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / Path(test[0]["image"]).name).symlink_to(test[0]["image"])
    other = segmentation.load_segmentation_model(run / "checkpoints" / "best.pt")
    other_data = make_synthetic_ct(tmp_path / "other", n_labeled=4, n_unlabeled=0, shape=(32, 32, 8), seed=5)
    other.cfg = other.cfg.model_copy(
        update={
            "data": other.cfg.data.model_copy(update={"path": str(other_data), "unlabeled_path": str(pool)})
        }
    )
    with pytest.raises(DataError, match=r"trained \(with or without labels\) or validated on 1 of the"):
        segmentation._refuse_seen_by_members(segmentation.ModelEnsemble([first, other]), test, "test")


def test_evaluate_scores_the_labels_that_training_set_aside(msd, tmp_path):
    # 6 studies: 1 validates, 1 tests, 4 train, of which labeled_count keeps 2 labelled.
    run = _train(msd, tmp_path, "few", "data.labeled_count=2")
    ckpt = str(run / "checkpoints" / "best.pt")
    for split, n in (("all", 6), ("train", 4), ("test", 1)):
        out = tmp_path / f"eval-{split}"
        assert main(["evaluate", "--checkpoint", ckpt, "--split", split, "--output", str(out)]) == 0
        assert json.loads((out / "summary.json").read_text())["n_cases"] == n, split


def test_predicted_specks_below_the_minimum_size_become_background(tmp_path):
    hu = np.full((16, 12, 6), -900, dtype=np.int16)
    hu[3:9, 3:9, 1:5] = 100  # a lesion of 144 voxels = 144 mm³ × 1.5
    hu[13, 10, 3] = 100  # one bright voxel far from it
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    study = tmp_path / "in" / "case.nii.gz"
    study.parent.mkdir()
    nib.save(nib.Nifti1Image(hu, affine), study)
    raw = {"input": {"mode": "2.5d", "slab": 3, "axis": 2}, "train": {"batch_size": 1}}
    labels, probs, _ = segmentation.predict_study(_model(raw, ThresholdNet(0.5), 3), study)
    assert labels[13, 10, 3] == 1 and labels.sum() == 145

    raw["eval"] = {"min_component_size": 10.0}  # mm³: the speck is 1.5
    cleaned, cleaned_probs, _ = segmentation.predict_study(_model(raw, ThresholdNet(0.5), 3), study)
    assert cleaned[13, 10, 3] == 0 and cleaned.sum() == 144
    np.testing.assert_array_equal(cleaned_probs, probs)  # the probabilities are left as predicted


def test_keep_largest_of_an_unknown_class_stops_training_before_it_starts(msd, tmp_path, capsys):
    args = ["train", str(DEMO_YAML), "--output-dir", str(tmp_path)]
    for item in [f"data.path={msd}", "run.name=bad", *FAST, "eval.keep_largest=[tumour]"]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "eval.keep_largest names 'tumour'" in err and "['lesion']" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_model_trained_on_a_gpu_predicts_on_a_machine_without_one(tmp_path, monkeypatch, caplog):
    from fewlabel.networks.segmentation import build_segmentation_net

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = {"task": "segmentation", "data": {"path": "unused"}, "run": {"device": "cuda"}}
    raw["model"] = {"features": [4, 4, 8, 8, 16, 4]}
    cfg = parse_config(raw)
    meta = {"task": "segmentation", "classes": ["background", "lesion"], "spatial_dims": 2, "in_channels": 1}
    meta["config"] = cfg.model_dump(mode="json")
    net = build_segmentation_net(cfg.model, 2, 1, 2)
    ckpt = save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "gpu.pt")
    with caplog.at_level("WARNING"):
        model = segmentation.load_segmentation_model(ckpt)
    assert model.device == torch.device("cpu")
    assert "gpu.pt: run.device='cuda'" in caplog.text and "running on cpu instead" in caplog.text
    chosen = segmentation.load_segmentation_model(
        ckpt, eval_overrides=["run.device=cpu", "run.num_threads=1"]
    )
    assert chosen.device == torch.device("cpu") and chosen.cfg.run.num_threads == 1
    with pytest.raises(ConfigError, match="run.device='cuda'.*CUDA is not available"):  # asked for: refused
        segmentation.load_segmentation_model(ckpt, eval_overrides=["run.device=cuda"])
    with pytest.raises(
        ConfigError, match=r"'model.features=\[1\]': only eval\.\*, run.device and run.num_threads"
    ):
        segmentation.load_segmentation_model(ckpt, eval_overrides=["model.features=[1]"])


def test_a_merge_of_unknown_labels_stops_training_before_it_starts(msd, tmp_path, capsys):
    args = ["train", str(DEMO_YAML), "--output-dir", str(tmp_path)]
    for item in [f"data.path={msd}", "run.name=bad", *FAST, "eval.merge={any_lesion: [1, 2]}"]:
        args += ["--set", item]
    assert main(args) == 2
    assert "eval.merge: merged class 'any_lesion' must list foreground labels" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_test_time_augmentation_on_a_3d_model_is_warned_about(tmp_path, caplog):
    from fewlabel.networks.segmentation import build_segmentation_net

    raw = {
        "task": "segmentation",
        "data": {"path": "unused"},
        "input": {"mode": "3d", "patch_size": [16, 16, 16]},
        "model": {"features": [4, 4, 8, 8, 16, 4]},
    }
    cfg = parse_config(raw)
    net = build_segmentation_net(cfg.model, 3, 1, 2)
    meta = {
        "task": "segmentation",
        "classes": ["background", "lesion"],
        "spatial_dims": 3,
        "in_channels": 1,
        "config": cfg.model_dump(mode="json"),
    }
    ckpt = save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "3d.pt")
    with caplog.at_level("WARNING"):
        model = segmentation.load_segmentation_model(ckpt, eval_overrides=["eval.tta=true"])
    assert "3d.pt: eval.tta averages in-plane turns of 2D/2.5D slices" in caplog.text
    assert "turns and flips" not in model.describe()  # the report does not claim it either
