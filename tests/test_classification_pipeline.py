"""Retinopathy grading end to end on a tiny synthetic fundus set: train, evaluate, predict.

Every run sets ``run.num_threads=1``: on small shared CI machines several torch threads
per process contend for two cores and make tiny networks many times slower.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewlabel.cli import main
from fewlabel.config import parse_config
from fewlabel.data.synthetic_fundus import make_synthetic_fundus
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.pipelines.classification import evaluate

SIZE = 48
CLASSES = ["grade_0", "grade_1", "grade_2"]


@pytest.fixture(autouse=True)
def one_thread():
    """Evaluate/predict (and the helpers here) run on one thread too; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fundus(tmp_path_factory) -> Path:
    """3 grades x 8 images at 48 px (two images per patient)."""
    return make_synthetic_fundus(
        tmp_path_factory.mktemp("fundus") / "data", n_per_class=8, num_classes=3, size=SIZE
    )


def _write_config(path: Path, data_path: Path, **sections) -> Path:
    cfg = {
        "task": "classification",
        "run": {"output_dir": str(path.parent / "runs"), "num_threads": 1},
        "data": {"path": str(data_path), "val_fraction": 0.25, "test_fraction": 0.25, "cache": False},
        "model": {"weights": "none", "image_size": SIZE, "freeze": "none", "dropout": 0.2},
        "train": {
            "max_epochs": 2,
            "batch_size": 6,
            "optimizer": "adam",
            "lr_head": 1e-3,
            "lr_backbone": 1e-3,
        },
        "eval": {"gallery_size": 4},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _in_unit_range(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


def _calibrated_weights(path: Path) -> Path:
    """A torchvision-layout GoogLeNet state dict whose BatchNorm statistics are realistic.

    Stands in for pretrained weights offline: a randomly initialised network's eval-mode
    features vanish (BatchNorm running statistics still at their initial values), which
    would make bottleneck features meaningless.
    """
    from torchvision.models import GoogLeNet

    torch.manual_seed(0)
    net = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: exact after a few batches
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(6, 3, SIZE, SIZE))
    save_checkpoint(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(tmp_path, fundus):
    cfg = _write_config(tmp_path / "exp.yaml", fundus)
    rc = main(
        [
            "train",
            str(cfg),
            "--set",
            "run.name=e2e",
            "--set",
            "train.val_every=1",
            "--set",
            "data.class_balance=weighted_loss",
        ]
    )
    assert rc == 0
    run = tmp_path / "runs" / "e2e"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    for rel in (
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "history.csv",
        "learning_curves.png",
        "eval/metrics.json",
        "eval/report.html",
        "eval/confusion_matrix.csv",
        "eval/confusion_matrix.png",
        "eval/roc_curves.png",
        "eval/predictions.csv",
    ):
        assert (run / rel).is_file(), rel
    assert not list(run.glob(".eval.partial-*"))

    history = _read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(float(r["train_loss"]) > 0 for r in history)
    assert all(r["val_kappa"] != "" or r["val_accuracy"] != "" for r in history)

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert _in_unit_range(metrics[key]), key
    assert metrics["kappa"] is None or -1.0 <= metrics["kappa"] <= 1.0
    assert metrics["n"] == 6 and metrics["context"]["split"] == "test"
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
    html = (run / "eval" / "report.html").read_text()
    assert "Confusion matrix" in html and "data:image/png;base64," in html

    best = load_checkpoint(run / "checkpoints" / "best.pt")
    meta = best["meta"]
    assert meta["task"] == "classification" and meta["classes"] == CLASSES
    assert meta["image_size"] == SIZE and len(meta["mean"]) == 3 and meta["channels"] == 3
    assert meta["best_metric"] == "kappa" and meta["model"]["weights"] == "none"
    parse_config(meta["config"])  # the stored config is complete and valid
    assert meta["software"]["Pytorch"] == torch.__version__  # what made the weights
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "engine", "rng"} <= set(last)
    assert last["engine"]["epoch"] == 2

    # evaluate: the checkpoint's own test split, then a whole folder.
    out = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--output", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["context"]["checkpoint epoch"] == str(metrics["context"]["best epoch"]) == str(meta["epoch"])
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--output", str(out)]) == 2
    out2 = tmp_path / "ev_all"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run / "checkpoints" / "best.pt"),
                "--data",
                str(fundus),
                "--output",
                str(out2),
            ]
        )
        == 0
    )
    assert json.loads((out2 / "metrics.json").read_text())["n"] == 24

    # predict: a folder plus a single image; probabilities are a distribution.
    pred = tmp_path / "pred.csv"
    single = next((fundus / "grade_2").glob("*.png"))
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "checkpoints" / "best.pt"),
                str(fundus / "grade_0"),
                str(single),
                "--output",
                str(pred),
            ]
        )
        == 0
    )
    rows = _read_csv(pred)
    assert len(rows) == 9 and rows[-1]["image"] == str(single)
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == CLASSES[max(range(3), key=probs.__getitem__)]
    before = pred.read_text()
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "checkpoints" / "best.pt"),
                str(single),
                "--output",
                str(pred),
            ]
        )
        == 2
    )
    assert pred.read_text() == before


@pytest.mark.slow
def test_bottleneck_then_finetune_caches_features_and_trains_head(tmp_path, fundus, caplog, monkeypatch):
    from fewlabel.engines import classification as engine

    started_from: dict = {}
    finetune = engine._run_finetune_stage

    def spy(ctx, *args, **kwargs):
        started_from.update(
            {k: v.cpu().clone() for k, v in ctx.model.state_dict().items() if k.startswith("net.fc.")}
        )
        return finetune(ctx, *args, **kwargs)

    monkeypatch.setattr(engine, "_run_finetune_stage", spy)
    weights = _calibrated_weights(tmp_path / "backbone.pt")
    cfg = _write_config(
        tmp_path / "bn.yaml",
        fundus,
        model={"weights": str(weights), "freeze": "inception4e", "aux_logits": True},
        train={
            "mode": "bottleneck_then_finetune",
            "bottleneck_epochs": 12,
            "max_epochs": 1,
            "lr_head": 0.002,
            "optimizer": "adam",
            "scheduler": "none",
            # On CUDA the gradient scaler skips the first steps of a run this short (its scale
            # starts too high), so the first epoch's loss would be the untrained head's.
            "amp": False,
        },
        eval={"tta_rotations": True, "gallery_size": 2},
    )
    with caplog.at_level(logging.INFO, logger="fewlabel.engines.classification"):
        assert main(["train", str(cfg), "--set", "run.name=bn"]) == 0
    run = tmp_path / "runs" / "bn"
    train_feats = load_checkpoint(run / "features" / "train.pt")
    val_feats = load_checkpoint(run / "features" / "val.pt")
    assert train_feats["features"].shape == (12, 4, 1024)  # 4 rotations of each training image
    assert val_feats["features"].shape == (6, 1, 1024)
    assert train_feats["features"].std() > 0

    history = _read_csv(run / "history.csv")
    stages = [r["stage"] for r in history]
    assert stages == ["bottleneck"] * 12 + ["finetune"]
    assert [int(r["epoch"]) for r in history] == list(range(1, 14))
    losses = [float(r["train_loss"]) for r in history if r["stage"] == "bottleneck"]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    # Fine-tuning starts from the best bottleneck epoch's classifier (the first of equals).
    scores = [float(r["val_kappa"]) if r["val_kappa"] else float("-inf") for r in history[:12]]
    best = 1 + scores.index(max(scores))
    assert f"fine-tuning starts from the classifier of epoch {best} " in caplog.text
    saved = load_checkpoint(run / "checkpoints" / "best.pt")
    if saved["meta"]["epoch"] == best:  # still the bottleneck epoch's (fine-tuning did not beat it)
        assert started_from and all(torch.equal(v, saved["model"][k]) for k, v in started_from.items())
    assert (run / "eval" / "report.html").is_file()

    # The checkpoint rebuilds offline with the pretrained input convention.
    pred = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run / "checkpoints" / "best.pt"),
                str(fundus / "grade_1"),
                "--output",
                str(pred),
            ]
        )
        == 0
    )
    assert len(_read_csv(pred)) == 8


@pytest.mark.slow
def test_resume_continues_after_a_crash(tmp_path, fundus, monkeypatch):
    from fewlabel.engines import handlers

    weights = _calibrated_weights(tmp_path / "backbone.pt")
    cfg = _write_config(
        tmp_path / "rs.yaml",
        fundus,
        model={"weights": str(weights), "aux_logits": False},
        train={"mode": "bottleneck", "bottleneck_epochs": 4, "lr_head": 0.01},
    )
    original = handlers.ResumableCheckpointer.save
    calls = {"n": 0}

    def crash_after_second_epoch(self, payload, iteration):
        path = original(self, payload, iteration)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated power cut")
        return path

    monkeypatch.setattr(handlers.ResumableCheckpointer, "save", crash_after_second_epoch)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train", str(cfg), "--set", "run.name=rs"])
    run = tmp_path / "runs" / "rs"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["engine"]["epoch"] == 2
    features_mtime = (run / "features" / "train.pt").stat().st_mtime_ns

    monkeypatch.setattr(handlers.ResumableCheckpointer, "save", original)
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert [int(r["epoch"]) for r in _read_csv(run / "history.csv")] == [1, 2, 3, 4]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["engine"]["epoch"] == 4
    assert (run / "features" / "train.pt").stat().st_mtime_ns == features_mtime  # reused, not re-extracted
    assert (run / "eval" / "report.html").is_file()


def test_a_resume_between_the_two_stages_trains_as_a_run_never_stopped(tmp_path, fundus, monkeypatch):
    from fewlabel.engines import classification as engine

    cfg = _write_config(
        tmp_path / "st.yaml",
        fundus,
        data={"val_fraction": 0.0},  # nothing else draws random numbers between the stages
        model={"aux_logits": False},
        train={"mode": "bottleneck_then_finetune", "bottleneck_epochs": 1, "max_epochs": 1},
    )
    assert main(["train", str(cfg), "--set", "run.name=whole"]) == 0
    real = engine._run_finetune_stage

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(engine, "_run_finetune_stage", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train", str(cfg), "--set", "run.name=cut"])
    monkeypatch.setattr(engine, "_run_finetune_stage", real)
    assert main(["train", "--resume", str(tmp_path / "runs" / "cut")]) == 0
    whole = load_checkpoint(tmp_path / "runs" / "whole" / "checkpoints" / "last.pt")["model"]
    cut = load_checkpoint(tmp_path / "runs" / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # same dropout masks, same batches


def test_a_diverged_loss_stops_training_with_advice(tmp_path, fundus, monkeypatch, capsys):
    from fewlabel.engines import classification as engine

    real = engine._criterion

    def diverging(*args, **kwargs):
        criterion = real(*args, **kwargs)
        return lambda logits, aux, y: criterion(logits, aux, y) * float("nan")

    monkeypatch.setattr(engine, "_criterion", diverging)
    cfg = _write_config(tmp_path / "nan.yaml", fundus, train={"max_epochs": 1})
    assert main(["train", str(cfg), "--set", "run.name=nan"]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan at iteration 1" in err and "train.lr_head" in err
    assert json.loads((tmp_path / "runs" / "nan" / "status.json").read_text())["state"] == "failed"


def _fake_checkpoint(
    tmp_path: Path, data_path: Path, name: str = "fake", init: int = 0, spread: float = 0.0, **sections
) -> Path:
    """A checkpoint of an untrained model: enough to test evaluate/predict input checks.

    Untrained networks grade every image 1/3 each; ``spread`` > 0 gives the classifier random
    biases of that scale, so that models of other ``init`` visibly disagree.
    """
    from fewlabel.engines.classification_eval import checkpoint_meta
    from fewlabel.networks.googlenet import build_googlenet

    cfg = parse_config(
        yaml.safe_load(_write_config(tmp_path / f"{name}.yaml", data_path, **sections).read_text())
    )
    torch.manual_seed(init)
    model = build_googlenet(3, "none", "none", 0.2, True)
    with torch.no_grad():
        model.net.fc.bias.copy_(spread * torch.randn(3))
    meta = checkpoint_meta(
        cfg, CLASSES, 3, (0.5,) * 3, (0.5,) * 3, best_metric="kappa", best_value=None, epoch=0
    )
    return save_checkpoint({"model": model.state_dict(), "meta": meta}, tmp_path / f"{name}.pt")


def test_several_checkpoints_grade_with_their_mean_probabilities(tmp_path, fundus, capsys):
    first = _fake_checkpoint(tmp_path, fundus, "a", init=1, spread=1.0)
    # Another input size and test-time augmentation: each member predicts its own way.
    second = _fake_checkpoint(
        tmp_path, fundus, "b", init=2, spread=1.0, model={"image_size": 32}, eval={"tta_rotations": True}
    )
    images = str(fundus / "grade_1")
    alone = []
    for ckpt in (first, second):
        out = tmp_path / f"{ckpt.stem}.csv"
        assert main(["predict", "--checkpoint", str(ckpt), images, "--output", str(out)]) == 0
        alone.append(_read_csv(out))
    both = ["--checkpoint", str(first), "--checkpoint", str(second)]
    assert main(["predict", *both, images, "--output", str(tmp_path / "mean.csv")]) == 0
    mean = _read_csv(tmp_path / "mean.csv")
    columns = [f"prob_{c}" for c in CLASSES]
    assert [r["image"] for r in mean] == [r["image"] for r in alone[0]]
    assert any(abs(float(a[c]) - float(b[c])) > 0.01 for a, b in zip(*alone, strict=True) for c in columns)
    for row, a, b in zip(mean, *alone, strict=True):
        expected = [(float(a[c]) + float(b[c])) / 2 for c in columns]
        assert [float(row[c]) for c in columns] == pytest.approx(expected, abs=2e-6)
        assert row["predicted"] == CLASSES[int(np.argmax([float(row[c]) for c in columns]))]

    # Scored on the first one's test split: both held out the same images (same seed).
    capsys.readouterr()
    assert main(["evaluate", *both, "--output", str(tmp_path / "ens")]) == 0
    report = (tmp_path / "ens" / "report.html").read_text(encoding="utf-8")
    assert "mean of 2 models" in report and "32 px, mean of 4 rotations" in report

    # A run of another seed drew another split: it trained on some of those test images.
    other = _fake_checkpoint(tmp_path, fundus, "c", init=3, run={"seed": 5})
    pair = ["--checkpoint", str(first), "--checkpoint", str(other)]
    assert main(["evaluate", *pair, "--output", str(tmp_path / "leak")]) == 2
    err = capsys.readouterr().err
    assert "c.pt" in err and "was trained or validated on" in err
    assert not (tmp_path / "leak").exists()
    # On other data (used whole) the choice is the user's: no split to leak from.
    assert main(["evaluate", *pair, "--data", str(fundus), "--output", str(tmp_path / "whole")]) == 0


def test_an_ensemble_of_models_of_two_npz_files_is_not_refused_for_their_shared_ids(tmp_path, capsys):
    # Both files number their images train_0, train_1, ...: the same id is another image.
    checkpoints = []
    for k in (0, 1):
        rng = np.random.default_rng(k)
        arrays = {}
        for split, n in (("train", 12), ("val", 4), ("test", 4)):
            arrays[f"{split}_images"] = rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
        np.savez(tmp_path / f"site{k}.npz", **arrays)
        data = {"use_official_split": False, "classes": CLASSES}
        checkpoints.append(
            _fake_checkpoint(
                tmp_path, tmp_path / f"site{k}.npz", f"site{k}", init=k, data=data, run={"seed": k}
            )
        )
    pair = [arg for c in checkpoints for arg in ("--checkpoint", str(c))]
    assert main(["evaluate", *pair, "--output", str(tmp_path / "ens")]) == 0, capsys.readouterr().err


def test_evaluate_rejects_unknown_classes_and_unsafe_outputs(tmp_path, fundus, capsys, monkeypatch):
    ckpt = _fake_checkpoint(tmp_path, fundus)
    other = make_synthetic_fundus(tmp_path / "other", n_per_class=1, num_classes=4, size=32)
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(other), "--output", str(tmp_path / "o1")])
    assert rc == 2
    assert "grade_3" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    table = tmp_path / "labels.csv"
    image = next((fundus / "grade_0").glob("*.png"))
    table.write_text(f"image,label\n{image},grade_0\n{image},severe\n", encoding="utf-8")
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(table), "--output", str(tmp_path / "o2")])
    assert rc == 2
    assert "severe" in capsys.readouterr().err

    rc = main(
        ["evaluate", "--checkpoint", str(ckpt), "--data", str(fundus), "--output", str(fundus / "report")]
    )
    assert rc == 2
    assert not (fundus / "report").exists()
    # Without --data the checkpoint's own training folder is as much at risk: its report images
    # would be read as grade_0 images by the next training.
    inside = fundus / "grade_0" / "report"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--output", str(inside)])
    assert rc == 2 and "lies inside the input data folder" in capsys.readouterr().err
    assert not inside.exists()

    # --output . with --overwrite in a folder holding an old report and the user's notes:
    # refused before anything is evaluated, and nothing in the folder is touched.
    here = tmp_path / "work"
    here.mkdir()
    (here / "summary.json").write_text("{}")
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(fundus), "--output", ".", "--overwrite"])
    assert rc == 2 and "the current folder" in capsys.readouterr().err
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt", "summary.json"]
    # A link to a report folder is not replaced through the link either.
    (tmp_path / "link").symlink_to(here)
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(fundus),
            "--output",
            str(tmp_path / "link"),
            "--overwrite",
        ]
    )
    assert rc == 2 and "symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt", "summary.json"]


def test_a_stored_config_this_release_refuses_is_a_checkpoint_error(tmp_path, fundus, capsys):
    ckpt = _fake_checkpoint(tmp_path, fundus)
    saved = load_checkpoint(ckpt)
    saved["meta"]["config"]["train"]["lr_head"] = -1.0  # what a future or hand-edited file may hold
    save_checkpoint(saved, ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fake.pt (stored config)" in err and "train.lr_head" in err and "Traceback" not in err


def test_a_test_folder_of_a_single_grade_is_evaluated(tmp_path, fundus):
    ckpt = _fake_checkpoint(tmp_path, fundus)
    site = tmp_path / "site"
    shutil.copytree(fundus / "grade_2", site / "grade_2")  # one clinic's referable cases only
    result = evaluate(ckpt, str(site), tmp_path / "report")
    assert result["metrics"]["n"] == len(list((site / "grade_2").glob("*.png")))
    assert result["metrics"]["per_class"]["grade_2"]["support"] == result["metrics"]["n"]


def test_predict_checks_inputs_and_checkpoint(tmp_path, fundus, capsys):
    ckpt = _fake_checkpoint(tmp_path, fundus)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(bad), "--output", str(out)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists()
    inside = fundus / "grade_1" / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(fundus / "grade_1"), "--output", str(inside)]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err and not inside.exists()

    assert (
        main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "missing.png"), "--output", str(out)]) == 2
    )
    assert (
        main(["predict", "--checkpoint", str(ckpt), str(fundus / "grade_0"), "--output", str(tmp_path)]) == 2
    )

    weird = save_checkpoint({"model": {}, "meta": {"task": "segmentation"}}, tmp_path / "seg.pt")
    from fewlabel.engines.classification_eval import model_from_checkpoint
    from fewlabel.errors import CheckpointError

    with pytest.raises(CheckpointError, match="segmentation"):
        model_from_checkpoint(load_checkpoint(weird), weird)


def test_resumable_checkpointer_keeps_the_last_states(tmp_path):
    from fewlabel.engines.handlers import ResumableCheckpointer

    saver = ResumableCheckpointer(tmp_path, keep_last=2)
    for it in (10, 20, 30):
        saver.save({"iteration": it, "w": torch.full((2,), float(it))}, it)
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 30
    kept = sorted(p.name for p in tmp_path.glob("last-*.pt"))
    assert kept == ["last-000000020.pt", "last-000000030.pt"]
    assert not list(tmp_path.glob(".*"))

    # Past 999999999 the names no longer sort like the iterations; and a run restarted from
    # scratch beside older states keeps its own newest ones, not the stale later ones.
    for it in (999_999_999, 1_000_000_000, 1_000_000_001):
        saver.save({"iteration": it}, it)
    assert sorted(p.name for p in tmp_path.glob("last-*.pt")) == ["last-1000000000.pt", "last-1000000001.pt"]
    (tmp_path / "last.pt").unlink()
    for it in (5, 15):
        saver.save({"iteration": it}, it)
    assert sorted(p.name for p in tmp_path.glob("last-*.pt")) == ["last-000000005.pt", "last-000000015.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 15

    single = ResumableCheckpointer(tmp_path / "one")
    single.save({"iteration": 1}, 1)
    single.save({"iteration": 2}, 2)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["last.pt"]
    assert load_checkpoint(tmp_path / "one" / "last.pt")["iteration"] == 2


def test_training_history_round_trip(tmp_path):
    from fewlabel.engines.handlers import TrainingHistory

    history = TrainingHistory(tmp_path)
    history.append({"stage": "finetune", "epoch": 1, "train_loss": 1.5, "val_kappa": None}, plot=False)
    history.append({"stage": "finetune", "epoch": 2, "train_loss": 1.2, "val_kappa": 0.4, "lr_head": 0.01})
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    rows = _read_csv(tmp_path / "history.csv")
    assert rows[0]["val_kappa"] == "" and rows[1]["val_kappa"] == "0.4"

    resumed = TrainingHistory(tmp_path)
    resumed.load(upto=1)
    assert resumed.rows == [
        {"stage": "finetune", "epoch": 1, "train_loss": 1.5, "val_kappa": None, "lr_head": None}
    ]


def test_feature_cache_is_extracted_again_when_a_label_changes(tmp_path):
    from fewlabel.engines.bottleneck import cached_features

    def features_of(records):
        labels = torch.tensor([r["label"] for r in records])
        return lambda: {"features": torch.zeros(2, 1, 4), "labels": labels, "ids": ["a", "b"], "rotations": 1}

    path = tmp_path / "train.pt"
    first = [{"id": "a", "label": 0}, {"id": "b", "label": 1}]
    cached_features(path, first, features_of(first), 1)
    assert cached_features(path, first, lambda: pytest.fail("extracted again"), 1)["labels"].tolist() == [
        0,
        1,
    ]
    corrected = [{"id": "a", "label": 1}, {"id": "b", "label": 1}]  # a grade fixed in the CSV
    assert cached_features(path, corrected, features_of(corrected), 1)["labels"].tolist() == [1, 1]
    # Another backbone or preprocessing (another fingerprint) is extracted again, then reused.
    again = features_of(corrected)
    assert cached_features(path, corrected, again, 1, fingerprint="other")["fingerprint"] == "other"
    assert cached_features(path, corrected, lambda: pytest.fail("extracted again"), 1, "other")


def test_a_resumed_position_counts_the_epoch_it_was_saved_in():
    from fewlabel.engines.classification import _resume_position

    assert _resume_position({"epoch": 2, "iteration": 0}, 4) == (2, 0)  # an epoch end
    # mid-epoch, saved by one process with 4 iterations an epoch: 3 of epoch 2 done
    assert _resume_position({"epoch": 1, "iteration": 7, "epoch_length": 4}, 4) == (1, 3)
    # resumed where epochs have 3 iterations (iteration 7 // 3 would claim epoch 3 done):
    # 2 done is still epoch 2, and 3 done completes it
    assert _resume_position({"epoch": 1, "iteration": 6, "epoch_length": 4}, 3) == (1, 2)
    assert _resume_position({"epoch": 1, "iteration": 7, "epoch_length": 4}, 3) == (2, 0)
    assert _resume_position({"epoch": 1, "iteration": 7}, 4) == (1, 3)  # before epoch_length was saved


def test_a_completed_run_resumed_with_more_epochs_trains_them(tmp_path, fundus):
    cfg = _write_config(
        tmp_path / "more.yaml",
        fundus,
        model={"aux_logits": False},
        train={"max_epochs": 2, "scheduler": "cosine"},
    )
    assert main(["train", str(cfg), "--set", "run.name=more"]) == 0
    run = tmp_path / "runs" / "more"
    text = (run / "config.yaml").read_text().replace("max_epochs: 2", "max_epochs: 4")
    (run / "config.yaml").write_text(text)
    assert main(["train", "--resume", str(run)]) == 0
    rows = _read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    rates = [float(r["lr_head"]) for r in rows]
    assert all(b <= a for a, b in itertools.pairwise(rates))  # the cosine does not climb back up


def test_a_finished_stage_goes_on_when_resumed_with_more_epochs(tmp_path):
    from fewlabel.engines.classification import _stage_goes_on

    cfg = parse_config(
        {"task": "classification", "data": {"path": str(tmp_path)}, "train": {"max_epochs": 4}}
    )
    done = {"stage_done": True, "engine": {"epoch": 2, "iteration": 0}}
    assert _stage_goes_on(cfg, "finetune", {**done, "early_stopped": False})
    assert not _stage_goes_on(cfg, "finetune", {**done, "early_stopped": True})  # stopped early: stays done
    assert not _stage_goes_on(cfg, "finetune", done)  # a checkpoint from before the flag
    assert not _stage_goes_on(cfg, "finetune", {**done, "early_stopped": False, "engine": {"epoch": 4}})


def test_a_one_grade_validation_split_selects_by_loss(caplog):
    from fewlabel.engines.classification import selectable_metric

    with caplog.at_level("WARNING"):
        assert selectable_metric("auc", [1, 1, 1], ["no", "yes"]) == "loss"
    assert "holds one grade only (yes): auc is undefined on it" in caplog.text
    assert selectable_metric("kappa", [0, 0], ["a", "b", "c"]) == "loss"
    assert selectable_metric("kappa", [0, 2], ["a", "b", "c"]) == "kappa"
    assert selectable_metric("accuracy", [0, 0], ["a", "b"]) == "accuracy"  # defined on one grade


def test_fine_tuning_with_random_frozen_layers_is_warned_about(tmp_path, caplog):
    from fewlabel.engines.classification import warn_random_frozen_layers

    def experiment(**model):
        raw = {
            "task": "classification",
            "data": {"path": str(tmp_path)},
            "model": {"weights": "none", **model},
        }
        return parse_config(raw)

    with caplog.at_level("WARNING"):
        assert warn_random_frozen_layers(experiment())  # the default freeze: conv3
    assert "model.freeze=conv3: the frozen layers keep their random initialisation" in caplog.text
    assert not warn_random_frozen_layers(experiment(freeze="none"))
    assert not warn_random_frozen_layers(experiment(weights="imagenet"))


def test_feature_fingerprint_follows_the_backbone_preprocessing_and_images_not_the_head(tmp_path):
    from fewlabel.engines.bottleneck import feature_fingerprint
    from fewlabel.networks.googlenet import build_googlenet

    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    records = [
        {"id": "a", "label": 0, "image": str(image)},
        {"id": "b", "label": 1, "image": np.ones((4, 4))},
    ]
    model = build_googlenet(3, "none", "conv3", 0.2, True)
    settings = {"image_size": 48, "mean": [0.5] * 3, "std": [0.5] * 3}
    first = feature_fingerprint(model, records, settings)
    with torch.no_grad():
        model.net.fc.weight.add_(1.0)  # the head trains on the cached features
        model.net.aux1.fc2.bias.add_(1.0)
    assert feature_fingerprint(model, records, settings) == first
    assert feature_fingerprint(model, records, {**settings, "image_size": 64}) != first
    image.write_bytes(b"replaced")  # same name, other pixels
    replaced = feature_fingerprint(model, records, settings)
    assert replaced != first
    with torch.no_grad():
        model.net.inception5b.branch1.conv.weight.mul_(2.0)  # another backbone
    assert feature_fingerprint(model, records, settings) != replaced
