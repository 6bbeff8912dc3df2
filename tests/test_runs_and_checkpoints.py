"""Run folders and checkpoint files: no overwrite, status tracking, atomic and safe I/O."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from fewlabel import __version__
from fewlabel.engines.checkpoint import (
    ensemble_paths,
    export_paths,
    export_safetensors,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    version_note,
)
from fewlabel.errors import CheckpointError, DataError, RunDirError
from fewlabel.runs import create_run_dir, open_run_dir, track_run
from fewlabel.utils.files import check_replaceable
from fewlabel.utils.runtime import rng_state, set_rng_state


def test_run_dir_is_never_overwritten_silently(tmp_path):
    run = create_run_dir(tmp_path, "exp")
    run.write_status("completed")
    (run.path / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match="--overwrite"):
        create_run_dir(tmp_path, "exp")
    assert (run.path / "keep.txt").read_text() == "precious"
    again = create_run_dir(tmp_path, "exp", overwrite=True)
    assert not (again.path / "keep.txt").exists()


def test_a_run_that_failed_before_training_is_replaced_without_overwrite(tmp_path):
    run = create_run_dir(tmp_path, "exp")
    (run.config_file).write_text("task: segmentation\n")
    with pytest.raises(DataError), track_run(run):
        raise DataError(tmp_path / "case.nii.gz", "truncated NIfTI")
    again = create_run_dir(tmp_path, "exp")
    assert sorted(p.name for p in again.path.iterdir()) == ["status.json"]
    assert again.read_status()["state"] == "created"

    # Anything more than config and status (a checkpoint, a log, a user's file) is kept safe,
    # and so is a run that is still running or completed.
    for state, extra in (("failed", "checkpoints"), ("running", None), ("completed", None)):
        again.config_file.write_text("task: segmentation\n")
        again.write_status(state)
        if extra:
            (again.path / extra).mkdir()
        with pytest.raises(RunDirError, match="--overwrite"):
            create_run_dir(tmp_path, "exp")
        assert again.status_file.is_file()
        if extra:
            (again.path / extra).rmdir()


def test_a_run_stopped_before_its_training_began_is_replaced_without_overwrite(tmp_path):
    # Ctrl-C between the folder's creation and track_run (config written or not yet)
    run = create_run_dir(tmp_path, "exp")
    create_run_dir(tmp_path, "exp").config_file.write_text("task: segmentation\n")
    again = create_run_dir(tmp_path, "exp")
    assert again.path == run.path and again.read_status()["state"] == "created"


def test_generated_run_names_never_share_or_replace_a_folder(tmp_path, monkeypatch):
    import fewlabel.runs as runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261203-120000")  # one second
    first = create_run_dir(tmp_path, None, "sweep")
    (first.path / "checkpoints").mkdir()
    second = create_run_dir(tmp_path, None, "sweep", overwrite=True)
    third = create_run_dir(tmp_path, None, "sweep", overwrite=True)
    assert [r.path.name for r in (first, second, third)] == [
        "sweep-20261203-120000",
        "sweep-20261203-120000-2",
        "sweep-20261203-120000-3",
    ]
    assert (first.path / "checkpoints").is_dir()  # the first run's files are untouched


def test_overwrite_replaces_only_a_run_folder(tmp_path):
    # A folder fewlabel did not make (no status.json) survives --overwrite, even one holding a
    # config.yaml, a name many projects use.
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "thesis.tex").write_text("precious")
    (tmp_path / "exp" / "config.yaml").write_text("lr: 1")
    with pytest.raises(RunDirError, match="does not look like a fewlabel output"):
        create_run_dir(tmp_path, "exp", overwrite=True)
    assert (tmp_path / "exp" / "thesis.tex").read_text() == "precious"
    # Nor is a run folder replaced through a link to it.
    run = create_run_dir(tmp_path, "real")
    with track_run(run):
        pass
    (tmp_path / "link").symlink_to(run.path)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        create_run_dir(tmp_path, "link", overwrite=True)
    assert run.status_file.is_file()


def test_failed_run_is_marked_failed(tmp_path):
    run = create_run_dir(tmp_path, "exp")
    with pytest.raises(DataError), track_run(run):
        raise DataError(tmp_path / "img.png", "truncated image")
    status = json.loads(run.status_file.read_text())
    assert status["state"] == "failed"
    assert "img.png" in status["error"]


def test_a_run_stopped_by_sigterm_is_marked_failed_not_running(tmp_path):
    import signal

    from fewlabel.runs import RunTerminated

    before = signal.getsignal(signal.SIGTERM)
    run = create_run_dir(tmp_path, "exp")
    with pytest.raises(RunTerminated), track_run(run):
        os.kill(os.getpid(), signal.SIGTERM)  # as a batch scheduler at its time limit
        time.sleep(5)  # the handler raises before this ends
    status = json.loads(run.status_file.read_text())
    assert status["state"] == "failed" and "SIGTERM" in status["error"] and "--resume" in status["error"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the run


def test_completed_run_is_marked_completed(tmp_path):
    run = create_run_dir(tmp_path, "exp")
    with track_run(run):
        pass
    assert run.read_status()["state"] == "completed"


def test_a_resumed_run_that_completes_drops_the_old_error(tmp_path):
    run = create_run_dir(tmp_path, "exp")
    with pytest.raises(RuntimeError), track_run(run):
        raise RuntimeError("out of memory")
    assert run.read_status()["state"] == "failed" and "traceback" in run.read_status()
    with track_run(run):  # the resumed run, this time to the end
        pass
    status = run.read_status()
    assert status["state"] == "completed"
    assert "error" not in status and "traceback" not in status


def test_every_session_of_a_run_records_its_software(tmp_path, monkeypatch, caplog):
    run = create_run_dir(tmp_path, "exp")
    with track_run(run):
        pass
    (session,) = json.loads(run.environment_file.read_text())["sessions"]
    assert session["software"]["fewlabel"] == __version__
    assert session["software"]["Pytorch"] == torch.__version__
    assert session["started"] == run.read_status()["started"]

    # A resume under the same software adds a session quietly; under another PyTorch it warns.
    with track_run(run):
        pass
    assert "other software" not in caplog.text
    newer = {**session["software"], "Pytorch": "9.9.9"}
    monkeypatch.setattr("fewlabel.utils.environment.software_versions", lambda: newer)
    with track_run(run):
        pass
    sessions = json.loads(run.environment_file.read_text())["sessions"]
    assert [s["software"]["Pytorch"] for s in sessions] == [torch.__version__, torch.__version__, "9.9.9"]
    assert f"Pytorch {torch.__version__} -> 9.9.9" in caplog.text

    # The file records and does not steer: a damaged one is started again, the run goes on.
    run.environment_file.write_text("{not json")
    with track_run(run):
        pass
    assert len(json.loads(run.environment_file.read_text())["sessions"]) == 1
    assert run.read_status()["state"] == "completed"


def test_open_run_dir_requires_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        open_run_dir(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="not a fewlabel run"):
        open_run_dir(tmp_path / "plain")


def test_checkpoint_round_trip_and_no_temp_files(tmp_path):
    payload = {"model": {"w": torch.arange(4.0)}, "meta": {"classes": ["a", "b"], "epoch": 3}}
    path = save_checkpoint(payload, tmp_path / "ckpt" / "last.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert loaded["meta"] == payload["meta"]
    assert os.listdir(path.parent) == ["last.pt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


# The hostile file is a plain pickle (protocol 4), which torch warns about before refusing it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_would_execute_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="execute code"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint({"model": {"w": torch.randn(100)}}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(path)


def test_safetensors_export_and_reload(tmp_path):
    sd = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    out = export_safetensors(sd, {"classes": ["x", "y", "z"]}, tmp_path / "model")
    assert out.suffix == ".safetensors"
    assert json.loads(out.with_suffix(".json").read_text())["classes"] == ["x", "y", "z"]
    again = load_state_dict_file(out)
    assert torch.equal(again["layer.weight"], sd["layer.weight"])


def test_export_keeps_dotted_names_and_refuses_to_replace_a_sidecar(tmp_path, capsys):
    from fewlabel.cli import main

    assert [p.name for p in export_paths(tmp_path / "grading-v1.2")] == [
        "grading-v1.2.safetensors",
        "grading-v1.2.json",
    ]
    assert [p.name for p in export_paths(tmp_path / "m.safetensors")] == ["m.safetensors", "m.json"]
    ckpt = save_checkpoint(
        {"model": {"w": torch.zeros(2)}, "meta": {"classes": ["a", "b"]}}, tmp_path / "best.pt"
    )
    (tmp_path / "shared.json").write_text("notes of a colleague")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "shared")]) == 2
    assert "shared.json: exists already" in capsys.readouterr().err
    assert (tmp_path / "shared.json").read_text() == "notes of a colleague"
    assert not (tmp_path / "shared.safetensors").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "model-1.0")]) == 0
    assert (tmp_path / "model-1.0.safetensors").is_file() and (tmp_path / "model-1.0.json").is_file()


def test_file_system_refusals_and_misshapen_checkpoints_are_one_line_errors(tmp_path, capsys):
    from fewlabel.cli import main

    ckpt = save_checkpoint(
        {"model": {"w": torch.zeros(2)}, "meta": {"classes": ["a", "b"]}}, tmp_path / "a.pt"
    )
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "notes.txt" / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewlabel: error: ") and "notes.txt" in err and "Traceback" not in err

    for name, content in (
        ("meta.pt", {"meta": ["task"]}),
        ("model.pt", {"model": {"w": "zeros"}, "meta": {}}),
    ):
        path = save_checkpoint(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(path)
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(path), str(tmp_path), "--output", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"fewlabel: error: {path}")


def test_resume_allows_other_machines_and_more_epochs_but_not_other_settings(tmp_path, caplog):
    from fewlabel.config import parse_config
    from fewlabel.engines.checkpoint import check_resume_config, config_changes

    raw = {"task": "classification", "data": {"path": "x"}}
    saved = parse_config(raw).model_dump(mode="json")
    del saved["data"]["folds"]  # a run of an older fewlabel, before the key existed
    last = save_checkpoint({"meta": {"config": saved}}, tmp_path / "last.pt")
    moved = parse_config(
        {**raw, "run": {"device": "cpu", "num_threads": 7}, "data": {"path": "x", "num_workers": 3}}
    )
    check_resume_config(moved, last, tmp_path / "config.yaml")
    longer = parse_config({**raw, "train": {"max_epochs": 40}})
    with caplog.at_level("WARNING"):
        check_resume_config(longer, last, tmp_path / "config.yaml")
    assert "train.max_epochs changed from 20 to 40" in caplog.text and "cosine" in caplog.text
    other = parse_config({**raw, "run": {"seed": 3}, "model": {"freeze": "none"}})
    with pytest.raises(CheckpointError, match=r"config.yaml: differs .* \(run.seed, model.freeze\)"):
        check_resume_config(other, last, tmp_path / "config.yaml")
    assert config_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == ["a.c"]
    # The key the older run lacks was trained at its default: setting it now is a change too.
    folds = parse_config({**raw, "data": {"path": "x", "folds": 5}})
    with pytest.raises(CheckpointError, match=r"\(data.folds\)"):
        check_resume_config(folds, last, tmp_path / "config.yaml")


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    path = save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_exported_and_saved_files_follow_the_umask(tmp_path):
    import stat

    previous = os.umask(0o022)
    try:
        ckpt = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "c.pt")
        weights = export_safetensors({"w": torch.zeros(1)}, {}, tmp_path / "m")
    finally:
        os.umask(previous)
    for path in (ckpt, weights, weights.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_files_and_folders_are_written_where_chmod_is_refused(tmp_path, monkeypatch):
    from fewlabel.utils import files

    def no_permissions(path, mode):  # as on a vfat USB disk
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(files.os, "chmod", no_permissions)
    assert files.atomic_write_text(tmp_path / "a.txt", "kept").read_text() == "kept"
    with files.staged_folder(tmp_path / "report") as staging:
        (staging / "summary.json").write_text("{}")
    assert (tmp_path / "report" / "summary.json").is_file()


def test_a_staged_folder_keeps_the_group_bit_and_refuses_links_first(tmp_path):
    import stat

    from fewlabel.utils import files

    shared = tmp_path / "project"
    shared.mkdir()
    shared.chmod(0o2775)  # a group folder: new files take its group
    with files.staged_folder(shared / "report") as staging:
        (staging / "summary.json").write_text("{}")
    assert (shared / "report").stat().st_mode & stat.S_ISGID
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunDirError, match="symbolic link"), files.staged_folder(tmp_path / "link"):
        pytest.fail("the work must not start")
    assert (tmp_path / "link").is_symlink() and not list(tmp_path.glob(".link.*"))


def test_reading_the_umask_does_not_change_it(monkeypatch):
    from fewlabel.utils import files

    if not Path("/proc/self/status").is_file():
        pytest.skip("the umask can be read without setting it only on Linux")
    previous = os.umask(0o027)
    try:
        calls = []
        monkeypatch.setattr(files.os, "umask", lambda mask: calls.append(mask) or 0o027)
        assert files._umask() == 0o027
        assert calls == []  # never set, not even for a moment
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_version_note_is_silent_only_for_this_release():
    assert version_note({"fewlabel_version": __version__}) == ""
    assert "written by fewlabel 0.0.1; this is fewlabel" in version_note({"fewlabel_version": "0.0.1"})
    assert "does not record which fewlabel wrote it" in version_note({})


def test_check_replaceable_refuses_what_overwrite_must_not_delete(tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text("{}")
    check_replaceable(report)  # an earlier report
    check_replaceable(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    with pytest.raises(RunDirError, match="holds the input"):
        check_replaceable(tmp_path, inputs=[report / "summary.json"])
    with pytest.raises(RunDirError, match="holds the input"):
        check_replaceable(report, inputs=[report])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nii.gz").write_bytes(b"\0")
    with pytest.raises(RunDirError, match="does not look like a fewlabel output"):
        check_replaceable(tmp_path / "data")
    with pytest.raises(RunDirError, match="not a folder"):
        check_replaceable(tmp_path / "data" / "scan.nii.gz")
    # The current folder, or one above it, is never replaced, whatever it holds.
    monkeypatch.chdir(report)
    for here in (Path("."), Path(".."), report, Path("../report")):
        with pytest.raises(RunDirError, match="the current folder or a folder above it"):
            check_replaceable(here)


def test_an_ensemble_names_each_checkpoint_once_under_any_spelling(tmp_path):
    (tmp_path / "a").mkdir()
    one, other = tmp_path / "a" / "best.pt", tmp_path / "b.pt"
    assert ensemble_paths(one) == [one]
    assert ensemble_paths([str(one), other]) == [one, other]
    with pytest.raises(CheckpointError, match="given more than once"):
        ensemble_paths([one, other, tmp_path / "a" / ".." / "a" / "best.pt"])
    with pytest.raises(ValueError, match="no checkpoint given"):
        ensemble_paths([])
