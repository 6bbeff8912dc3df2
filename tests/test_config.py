"""Config loading: YAML, dotted overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fewlabel.config import apply_overrides, dump_config, load_config, parse_config
from fewlabel.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_classification_config_gets_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {"task": "classification", "data": {"path": "x"}}))
    assert cfg.model.weights == "imagenet"
    assert cfg.model.freeze == "conv3"
    assert cfg.augment.rotate90 is True
    assert cfg.train.lr_backbone < cfg.train.lr_head


def test_a_batch_of_one_needs_feature_maps_larger_than_one_pixel(tmp_path):
    from fewlabel.config.classification import MIN_SIZE_FOR_BATCH_OF_ONE
    from fewlabel.networks.googlenet import build_googlenet

    path = _write(tmp_path, {"task": "classification", "data": {"path": "x"}})
    with pytest.raises(ConfigError, match="train.batch_size: 1 needs model.image_size of at least 47"):
        load_config(path, ["train.batch_size=1", "model.image_size=40"])
    load_config(path, ["train.batch_size=1", f"model.image_size={MIN_SIZE_FOR_BATCH_OF_ONE}"])
    load_config(path, ["train.batch_size=2", "model.image_size=32"])
    load_config(path, ["train.batch_size=1", "model.image_size=32", "train.mode=bottleneck"])
    # The limit is the network's: one pixel less and a training step fails.
    torch.manual_seed(0)
    net = build_googlenet(3, "none", "none", 0.2, True).train()
    net(torch.randn(1, 3, MIN_SIZE_FOR_BATCH_OF_ONE, MIN_SIZE_FOR_BATCH_OF_ONE))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.randn(1, 3, MIN_SIZE_FOR_BATCH_OF_ONE - 1, MIN_SIZE_FOR_BATCH_OF_ONE - 1))


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "task: classification\ndata: {path: x}\ntrain:\n  max_epochs: 5\ntrain:\n  batch_size: 4\n"
    )
    with pytest.raises(ConfigError, match=r"exp.yaml: line 5: the key 'train' is given twice"):
        load_config(path)
    path.write_text("task: classification\ndata: {path: x, path: y}\n")
    with pytest.raises(ConfigError, match="the key 'path' is given twice"):
        load_config(path)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("exp #2", "exp #2"),
        ("#1", "#1"),
        ("%x@y*", "%x@y*"),
        ('"quoted name"', "quoted name"),
        ("001", "001"),
    ],
)
def test_text_overrides_are_taken_as_written(tmp_path, value, name):
    # YAML would cut "exp #2" at its comment, make "#1" null and refuse "%x".
    path = _write(tmp_path, {"task": "classification", "data": {"path": "x"}})
    assert load_config(path, [f"run.name={value}"]).run.name == name
    assert load_config(path, [f"data.path=a {value}"]).data.path == f"a {value}"  # quotes inside stay


def test_dotted_overrides_are_typed(tmp_path):
    path = _write(tmp_path, {"task": "classification", "data": {"path": "x"}})
    cfg = load_config(
        path, ["train.max_epochs=3", "train.lr_head=0.5", "data.classes=[a, b]", "model.weights=none"]
    )
    assert cfg.train.max_epochs == 3
    assert cfg.train.lr_head == 0.5
    assert cfg.data.classes == ["a", "b"]
    assert cfg.model.weights == "none"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("train.max_epoch=3", "train.max_epoch", "unknown key"),
        ("train.max_epochs=three", "train.max_epochs", "integer"),
        ("train.lr_head=-0.1", "train.lr_head", "greater than 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
        ("model.freeze=conv9", "model.freeze", "conv3"),
        ("bogus=1", "bogus", "unknown key"),
        # YAML reads on/yes as true, which pydantic alone would take as the number 1.
        ("train.max_epochs=on", "train.max_epochs", "takes numbers, not yes/no words"),
        ("train.lr_head=yes", "train.lr_head", "takes numbers, not yes/no words"),
        ("data.val_fraction=no", "data.val_fraction", "takes numbers, not yes/no words"),
        ("model.image_size=on", "model.image_size", "takes numbers, not yes/no words"),
        ("train.lr_head=.inf", "train.lr_head", "finite number"),
        ("train.weight_decay=.nan", "train.weight_decay", "finite number"),
        ("run.device=gpu", "run.device", "should match pattern"),
        ("run.device=tpu", "run.device", "should match pattern"),
        ("run.seed=18446744073709551616", "run.seed", "less than or equal to 9223372036854775807"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key, fragment):
    path = _write(tmp_path, {"task": "classification", "data": {"path": "x"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    message = str(err.value)
    assert f"{key}:" in message
    assert fragment in message
    assert str(path) in message


def test_yes_no_words_are_refused_inside_lists_and_next_to_other_errors(tmp_path):
    path = _write(tmp_path, {"task": "segmentation", "data": {"path": "x"}})
    overrides = [
        "preprocess.slice_size=[on, 64]",
        "model.features=[32, 32, 64, 128, 256, yes]",
        "eval.merge={infection: [1, yes]}",
        "train.batch_size=x",  # still reported beside them
        "train.max_epochs=on",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    for key in ("preprocess.slice_size", "model.features", "eval.merge", "train.max_epochs"):
        assert f"{key}: takes numbers, not yes/no words" in message, key
    assert "train.batch_size: Input should be a valid integer" in message


def test_yes_no_words_stay_booleans_where_a_switch_is_expected(tmp_path):
    path = _write(tmp_path, {"task": "segmentation", "data": {"path": "x"}, "augment": {"flip": "off"}})
    path.write_text(path.read_text().replace("'off'", "off"))  # unquoted, as a user writes it
    cfg = load_config(path, ["tcsm.enabled=yes", "train.batch_size=4", "eval.min_component_size=0"])
    assert cfg.augment.flip is False and cfg.tcsm.enabled is True
    assert cfg.train.batch_size == 4


def test_zoom_and_rotation_are_refused_for_3d_patches(tmp_path):
    path = _write(tmp_path, {"task": "segmentation", "data": {"path": "x"}, "input": {"mode": "3d"}})
    with pytest.raises(ConfigError, match="patch corners with air"):
        load_config(path, ["augment.rotate_degrees=10"])
    assert load_config(path, ["input.mode=2d", "augment.rotate_degrees=10"]).augment.rotate_degrees == 10


def test_missing_task_and_unknown_task():
    with pytest.raises(ConfigError, match="task"):
        parse_config({"data": {"path": "x"}})
    with pytest.raises(ConfigError, match="task"):
        parse_config({"task": "detection", "data": {"path": "x"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("task: classification\ndata: {path: r\xe9tine}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_config(latin1)


def test_text_keys_keep_override_text_as_typed(tmp_path):
    # YAML would read these as a number, a date and booleans; the keys hold text.
    path = _write(tmp_path, {"task": "classification", "data": {"path": "x", "classes": [0, 1, 2]}})
    assert load_config(path).data.classes == ["0", "1", "2"]
    cfg = load_config(path, ["run.name=001", "data.classes=[background, no, yes]", "data.path=2024-01-01"])
    assert cfg.run.name == "001"
    assert cfg.data.classes == ["background", "no", "yes"]
    assert cfg.data.path == "2024-01-01"
    assert load_config(path, ["run.name=null"]).run.name is None
    # Keys that hold numbers or switches still read YAML's types.
    cfg = load_config(path, ["train.amp=false", "train.lr_head=1e-3", "train.max_epochs=7"])
    assert cfg.train.amp is False and cfg.train.lr_head == 1e-3 and cfg.train.max_epochs == 7


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.max_epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.max_epochs=2"])


def test_overrides_do_not_mutate_input():
    raw = {"train": {"max_epochs": 1}}
    out = apply_overrides(raw, ["train.max_epochs=2"])
    assert raw["train"]["max_epochs"] == 1
    assert out["train"]["max_epochs"] == 2


def test_segmentation_cross_field_validation():
    with pytest.raises(ConfigError, match="input.slab"):
        parse_config({"task": "segmentation", "data": {"path": "x"}, "input": {"slab": 4}})
    with pytest.raises(ConfigError, match="preprocess.window"):
        parse_config({"task": "segmentation", "data": {"path": "x"}, "preprocess": {"window": [400, -1000]}})


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config({"task": "segmentation", "data": {"path": "x"}, "tcsm": {"enabled": True}})
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.task in ("classification", "segmentation")


def test_cropped_slices_need_a_slice_size():
    with pytest.raises(ConfigError, match="preprocess.slice_size"):
        parse_config(
            {
                "task": "segmentation",
                "data": {"path": "x"},
                "preprocess": {"crop_foreground": True, "slice_size": None},
            }
        )
    cfg = parse_config(
        {
            "task": "segmentation",
            "data": {"path": "x"},
            "preprocess": {"crop_foreground": True, "slice_size": [64, 64]},
        }
    )
    assert cfg.preprocess.slice_size == (64, 64)
    one = parse_config(
        {
            "task": "segmentation",
            "data": {"path": "x"},
            "preprocess": {"crop_foreground": True},
            "train": {"batch_size": 1},
        }
    )
    assert one.preprocess.slice_size is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_config_error() -> None:
    from fewlabel.utils.runtime import config_device

    assert config_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"run.device='cuda'.*not available"):
        config_device("cuda")


@pytest.mark.parametrize(
    ("task", "classes"),
    [("classification", ["a", "b", "b"]), ("segmentation", ["background", "lesion", "lesion"])],
)
def test_a_class_named_twice_is_refused(tmp_path, task, classes):
    path = _write(tmp_path, {"task": task, "data": {"path": "x", "classes": classes}})
    with pytest.raises(ConfigError, match=r"data: .*classes names '(b|lesion)' more than once"):
        load_config(path)


@pytest.mark.parametrize("name", ["001", "0123", "0x1F", "12:30", "2024-01-05", "+1", "1_000"])
def test_names_in_a_config_file_are_kept_as_written(tmp_path, name):
    # YAML 1.1 reads these as 1, 83, 31, 750, a date, 1 and 1000.
    path = tmp_path / "c.yaml"
    path.write_text(f"task: classification\ndata: {{path: x, classes: [00, 01]}}\nrun: {{name: {name}}}\n")
    cfg = load_config(path)
    assert cfg.run.name == name and cfg.data.classes == ["00", "01"]
    path.write_text("task: classification\ndata: {path: x}\ntrain: {max_epochs: 012, lr_head: 1.5e-3}\n")
    cfg = load_config(path)
    assert (cfg.train.max_epochs, cfg.train.lr_head) == (12, 0.0015)  # numbers still read as numbers


def test_yaml_anchors_merge_keys_and_empty_sections_are_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "task: segmentation\n"
        "data: {path: x}\n"
        "train:\n  <<: &fast {max_epochs: 2, lr: 0.01}\n  lr: 0.02\n"
        "tcsm:\n  # enabled: true\n"
    )
    cfg = load_config(path)
    assert (cfg.train.max_epochs, cfg.train.lr) == (2, 0.02)  # merged, then the own key wins
    assert cfg.tcsm.enabled is False  # the commented-out section keeps its defaults
    path.write_text("task: segmentation\ndata: {path: x}\ntrain:\n  checkpoint:\n    # keep_last: 3\n")
    assert (
        load_config(path).train.checkpoint.keep_last
        == load_config(path, ["train.lr=0.01"]).train.checkpoint.keep_last
    )
    assert load_config(path, ["train.max_epochs=012"]).train.max_epochs == 12  # as in a file, not octal 10
    path.write_text("task: segmentation\ndata: {path: x}\ntrain:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_config(path)


def test_a_mistyped_device_is_a_value_error_not_a_crash() -> None:
    from fewlabel.utils import runtime

    for name in ("gpu", "CPU", "cuda:-1", "meta", "xla"):
        with pytest.raises(ValueError, match=f"{name!r}"):
            runtime.select_device(name)


def test_a_run_without_determinism_undoes_an_earlier_deterministic_one() -> None:
    from fewlabel.utils.runtime import seed_everything

    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        seed_everything(0, deterministic=False)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch) -> None:
    from fewlabel.utils import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 1 GPU"):
        runtime.select_device("cuda:3")


def test_resuming_on_fewer_gpus_restores_the_generators_that_remain(monkeypatch) -> None:
    from fewlabel.utils import runtime

    state = runtime.rng_state()
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append(device))
    runtime.set_rng_state(state)
    assert restored == [0]
