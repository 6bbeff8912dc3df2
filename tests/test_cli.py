"""The command line: exit codes, run folders left behind, and the demo's wiring."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from fewlabel.cli import build_parser, main
from fewlabel.config import parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _classification_config(tmp_path: Path, data: Path, **train) -> Path:
    cfg = {
        "task": "classification",
        "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "num_threads": 1},
        "data": {"path": str(data)},
        "model": {"weights": "none", "image_size": 32},
        "train": {"max_epochs": 1, "batch_size": 4, **train},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_bad_config_key_exits_2_without_a_run_folder(tmp_path, capsys):
    cfg = _classification_config(tmp_path, tmp_path / "data")
    assert main(["train", str(cfg), "--set", "train.max_epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.max_epoch" in err and "unknown key" in err
    assert not (tmp_path / "runs").exists()


def test_bad_value_exits_2(tmp_path, capsys):
    cfg = _classification_config(tmp_path, tmp_path / "data")
    assert main(["train", str(cfg), "--set", "model.freeze=conv9"]) == 2
    assert "model.freeze" in capsys.readouterr().err


def test_failing_run_is_marked_failed_not_complete(tmp_path, capsys):
    (tmp_path / "empty_data").mkdir()  # exists, so the run starts, and fails on its content
    cfg = _classification_config(tmp_path, tmp_path / "empty_data")
    assert main(["train", str(cfg)]) == 2
    assert "empty_data" in capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "empty_data" in status["error"]
    assert not (run / "checkpoints" / "best.pt").exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    cfg = _classification_config(tmp_path, tmp_path / "data")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("keep me")
    assert main(["train", str(cfg)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == ["precious.txt"]


def test_overwrite_never_deletes_the_runs_own_inputs(tmp_path, capsys):
    # A config and a data folder kept inside an earlier run folder survive train --overwrite.
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "status.json").write_text('{"state": "completed"}')
    (run / "data").mkdir()
    (run / "data" / "scan.png").write_bytes(b"pixels")
    cfg = _classification_config(tmp_path, run / "data")
    inside = run / "edited.yaml"
    inside.write_text(cfg.read_text())
    assert main(["train", str(inside), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert (run / "data" / "scan.png").read_bytes() == b"pixels" and inside.is_file()


def test_a_run_folder_inside_the_data_folder_is_refused_before_it_is_made(tmp_path, capsys):
    data = tmp_path / "fundus"
    (data / "grade_0").mkdir(parents=True)
    (data / "grade_0" / "a.png").write_bytes(b"pixels")
    cfg = _classification_config(tmp_path, data)
    assert main(["train", str(cfg), "--output-dir", str(data)]) == 2
    assert "lies inside the data folder" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["grade_0"]  # no class folder "r" made


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    import fewlabel.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), interrupted))
    assert main(["train", str(tmp_path / "c.yaml")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("fewlabel: interrupted;") and "--resume" in err and "Traceback" not in err


def test_ignite_engine_chatter_is_left_out_unless_verbose(tmp_path, monkeypatch, caplog):
    import logging

    import fewlabel.cli as cli

    def run_an_engine(args):
        from ignite.engine import Engine, Events

        engine = Engine(lambda e, b: None)

        @engine.on(Events.ITERATION_COMPLETED)
        def stop(e):
            raise KeyboardInterrupt

        engine.run([0], max_epochs=1)

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), run_an_engine))
    monkeypatch.setattr(logging.getLogger("ignite"), "level", logging.NOTSET)
    caplog.handler.addFilter(cli._IgniteExceptionEcho())  # as main adds it to its own handlers
    caplog.set_level(logging.DEBUG)
    assert main(["train", str(tmp_path / "c.yaml")]) == 130
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("ignite")]
    caplog.clear()
    assert main(["-v", "train", str(tmp_path / "c.yaml")]) == 130
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ignite")]
    assert any("Engine run starting" in m for m in messages)
    assert not any("terminating due to exception" in m for m in messages)


def _with_func(parser, func):
    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.func = func
        return args

    parser.parse_args = parse_args
    return parser


def test_resume_rejects_config_and_missing_folder(tmp_path):
    cfg = _classification_config(tmp_path, tmp_path / "data")
    assert main(["train", str(cfg), "--resume", str(tmp_path / "runs" / "r")]) == 2
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--resume", "RUN", "--output-dir", "elsewhere"], "--output-dir"),
        (["train", "--resume", "RUN", "--overwrite"], "--overwrite"),
        (
            ["evaluate", "--pred", "P", "--gt", "G", "--checkpoint", "best.pt", "--output", "O"],
            "--checkpoint",
        ),
        (["evaluate", "--pred", "P", "--gt", "G", "--split", "all", "--output", "O"], "--split"),
        (["evaluate", "--checkpoint", "best.pt", "--classes", "bg", "lesion", "--output", "O"], "--classes"),
    ],
)
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, argv, named):
    argv = [str(tmp_path / a) if a in ("RUN", "P", "G", "O", "best.pt", "elsewhere") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []


def test_evaluate_and_predict_need_a_readable_checkpoint(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["evaluate", "--checkpoint", str(missing), "--output", str(tmp_path / "ev")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert (
        main(["predict", "--checkpoint", str(missing), str(tmp_path), "--output", str(tmp_path / "p.csv")])
        == 2
    )
    assert not (tmp_path / "ev").exists() and not (tmp_path / "p.csv").exists()


def test_demo_config_file_matches_the_demo():
    from fewlabel.pipelines.demo import DEMO_CLASSIFICATION

    from_file = parse_config(yaml.safe_load((REPO / "configs" / "demo_classification.yaml").read_text()))
    built_in = parse_config(DEMO_CLASSIFICATION)
    assert from_file.model_dump() == built_in.model_dump()


def test_shipped_classification_configs_are_valid():
    cfg = parse_config(yaml.safe_load((REPO / "configs" / "retinopathy_googlenet.yaml").read_text()))
    assert cfg.model.weights == "imagenet" and cfg.model.image_size == 224 and cfg.model.freeze == "conv3"
    assert cfg.train.optimizer == "sgd" and cfg.train.lr_head == 1e-2 and cfg.train.lr_backbone == 1e-3


@pytest.mark.slow
def test_demo_runs_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    from fewlabel.pipelines import demo

    # The real demo takes most of a minute; the wiring is the same at a fraction of the size.
    monkeypatch.setitem(demo.DEMO_FUNDUS, "n_per_class", 4)
    monkeypatch.setitem(demo.DEMO_FUNDUS, "num_classes", 3)
    monkeypatch.setitem(demo.DEMO_FUNDUS, "size", 32)
    monkeypatch.setitem(
        demo.DEMO_CLASSIFICATION, "model", {**demo.DEMO_CLASSIFICATION["model"], "image_size": 32}
    )
    monkeypatch.setitem(
        demo.DEMO_CLASSIFICATION,
        "train",
        {**demo.DEMO_CLASSIFICATION["train"], "max_epochs": 1, "batch_size": 4},
    )
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--skip-segmentation"]) == 0
    report = out / "classification" / "run" / "eval" / "report.html"
    assert report.is_file()
    assert str(report) in capsys.readouterr().out
    assert json.loads((out / "classification" / "run" / "status.json").read_text())["state"] == "completed"
    rows = (out / "classification" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("image,predicted,prob_grade_0") and len(rows) == 4
    assert not (out / "segmentation").exists()

    assert main(["demo", "--output", str(out), "--skip-segmentation"]) == 2
    assert report.is_file()
    assert main(["demo", "--output", str(out), "--skip-segmentation", "--overwrite"]) == 0
    assert (out / "classification" / ".fewlabel-demo").is_file() and report.is_file()


def test_demo_overwrite_never_deletes_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "work" / "classification"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(tmp_path / "work"), "--overwrite", "--skip-segmentation"]) == 2
    assert "does not look like a fewlabel output folder" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.path", "fundsu"), ("model.weights", "imagnet.pt")],
)
def test_a_mistyped_path_is_refused_before_any_run_folder_exists(tmp_path, capsys, key, value):
    config = Path(__file__).parents[1] / "configs" / "retinopathy_googlenet.yaml"
    argv = [
        "train",
        str(config),
        "--set",
        f"{key}={tmp_path / value}",
        "--output-dir",
        str(tmp_path / "runs"),
    ]
    if key != "data.path":
        (tmp_path / "fundus").mkdir()
        argv += ["--set", f"data.path={tmp_path / 'fundus'}"]
    assert main(argv) == 2
    assert f"{value}: not found (set by {key})" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.mark.parametrize("argv", [[]] + [[name] for name in _subcommands()])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fewlabel")
    # Docstring markup (``literal``, :func:) reads as noise in a terminal.
    assert "``" not in out and ":func:" not in out and ":mod:" not in out
