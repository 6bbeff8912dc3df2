"""Tests for the GoogLeNet transfer-learning model: heads, freezing, parameter groups, weights."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import GoogLeNet, GoogLeNet_Weights

from fewlabel.errors import CheckpointError, ConfigError
from fewlabel.networks.googlenet import FREEZE_ORDER, build_googlenet, parameter_groups

SIZE = 64  # small enough to be quick; the auxiliary heads pool to 4x4 and work at >= 32 px


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_googlenet(3, weights="none", freeze="conv3", dropout=0.4, aux_logits=True)


def test_heads_are_replaced(model):
    x = torch.randn(2, 3, SIZE, SIZE)
    model.train()
    logits, aux = model.forward_train(x)
    assert logits.shape == (2, 3)
    assert [a.shape for a in aux] == [(2, 3), (2, 3)]
    assert model.net.fc.out_features == 3
    assert model.net.aux1.fc2.out_features == 3 and model.net.aux2.fc2.out_features == 3
    assert model(x).shape == (2, 3)  # plain tensor in train mode too

    model.eval()
    with torch.no_grad():
        logits, aux = model.forward_train(x)
        assert aux == []
        feats = model.features(x)
        assert feats.shape == (2, 1024)
        torch.testing.assert_close(model.head_forward(feats), model(x))
        torch.testing.assert_close(logits, model(x))
    model.train()


def test_without_aux_heads_and_at_minimum_size():
    model = build_googlenet(2, weights="none", freeze="none", aux_logits=False)
    assert model.net.aux1 is None and not model.has_aux
    logits, aux = model.forward_train(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 2) and aux == []
    assert not any(n.startswith(("aux1", "aux2")) for n, _ in model.net.named_parameters())


def test_frozen_layers_get_no_gradient_and_keep_batchnorm_stats():
    torch.manual_seed(0)
    model = build_googlenet(3, weights="none", freeze="inception3b")
    frozen = FREEZE_ORDER[: FREEZE_ORDER.index("inception3b") + 1]
    model.train()
    for name in frozen:
        assert not getattr(model.net, name).training, f"{name} must stay in eval mode"
    assert model.net.inception4a.training

    bn_before = {k: v.clone() for k, v in model.net.state_dict().items() if "running_mean" in k}
    x = torch.randn(4, 3, SIZE, SIZE)
    logits, aux = model.forward_train(x)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss = loss + sum(nn.functional.cross_entropy(a, torch.tensor([0, 1, 2, 0])) for a in aux)
    loss.backward()

    for name, p in model.net.named_parameters():
        if name.split(".")[0] in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    after = model.net.state_dict()
    for k, v in bn_before.items():
        if k.split(".")[0] in frozen:
            assert torch.equal(after[k], v), f"frozen BatchNorm statistics changed: {k}"
    assert not torch.equal(
        after["inception4a.branch1.bn.running_mean"], bn_before["inception4a.branch1.bn.running_mean"]
    )


def test_freeze_all_leaves_only_heads_trainable():
    model = build_googlenet(2, weights="none", freeze="all")
    assert model.backbone_parameters() == []
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head_parameters()}
    names = [g["name"] for g in parameter_groups(model, 0.1, 0.01, 1e-4)]
    assert names == ["head_decay", "head_no_decay"]


def test_parameter_groups(model):
    groups = parameter_groups(model, lr_head=0.01, lr_backbone=0.001, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay"}
    assert by_name["head_decay"]["lr"] == 0.01 and by_name["head_no_decay"]["lr"] == 0.01
    assert by_name["backbone_decay"]["lr"] == 0.001 and by_name["backbone_no_decay"]["lr"] == 0.001
    assert (
        by_name["head_decay"]["weight_decay"] == 1e-4 and by_name["backbone_no_decay"]["weight_decay"] == 0.0
    )

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    frozen = {id(p) for p in model.net.conv1.parameters()}
    assert not frozen & set(grouped)

    def ids(name: str) -> set[int]:
        return {id(p) for p in by_name[name]["params"]}

    assert id(model.net.fc.weight) in ids("head_decay")
    assert id(model.net.fc.bias) in ids("head_no_decay")
    assert id(model.net.aux1.fc1.weight) in ids("head_decay")
    assert id(model.net.inception5b.branch1.bn.weight) in ids("backbone_no_decay")
    assert id(model.net.inception5b.branch1.conv.weight) in ids("backbone_decay")
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # groups are valid optimizer input


def test_local_state_dict_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)
    with torch.no_grad():  # non-default BatchNorm statistics, to see that buffers are loaded too
        source.conv1.bn.running_mean.uniform_()
    path = tmp_path / "imagenet_googlenet.pth"
    torch.save(source.state_dict(), path)

    model = build_googlenet(4, weights=str(path), freeze="none")
    assert model.net.transform_input and model.pretrained
    loaded = model.net.state_dict()
    expected = source.state_dict()
    backbone_keys = [k for k in expected if k.split(".")[0] in FREEZE_ORDER]
    assert backbone_keys
    for k in backbone_keys:
        assert torch.equal(loaded[k], expected[k]), k
    assert loaded["fc.weight"].shape == (4, 1024)
    assert loaded["aux1.fc2.weight"].shape == (4, 1024)


def test_state_dict_without_batchnorm_counters_is_loaded(tmp_path):
    # Files exported by other tools often drop BatchNorm's num_batches_tracked buffers.
    torch.manual_seed(2)
    source = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "exported.pth"
    torch.save(state, path)
    loaded = build_googlenet(3, weights=str(path), freeze="none").net.state_dict()
    assert torch.equal(
        loaded["inception5b.branch4.1.conv.weight"], state["inception5b.branch4.1.conv.weight"]
    )


def test_pickled_object_file_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(GoogLeNet(num_classes=10, aux_logits=False, init_weights=False), path)
    with pytest.raises(CheckpointError, match="whole_model.pth"):
        build_googlenet(3, weights=str(path))


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, path)
    with pytest.raises(CheckpointError, match=r"resnet.pth.*not torchvision GoogLeNet"):
        build_googlenet(3, weights=str(path))


def test_imagenet_weights_unavailable_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="model.weights"):
        build_googlenet(3, weights="imagenet")


def _torch_cache(monkeypatch, tmp_path) -> Path:
    """An empty torch hub cache; the path where torchvision looks for its GoogLeNet weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows TORCH_HOME
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder / Path(GoogLeNet_Weights.IMAGENET1K_V1.url).name


def test_imagenet_weights_are_read_from_torchs_cache_offline(monkeypatch, tmp_path):
    cached = _torch_cache(monkeypatch, tmp_path)
    torch.manual_seed(3)
    source = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)
    torch.save(source.state_dict(), cached)
    model = build_googlenet(2, weights="imagenet")
    assert model.pretrained and model.net.transform_input
    assert torch.equal(
        model.net.inception4c.branch2[1].conv.weight, source.inception4c.branch2[1].conv.weight
    )


def test_a_cached_imagenet_file_holding_code_is_refused_without_running_it(monkeypatch, tmp_path):
    # Offline sites copy the file into the cache by hand, where torch.hub checks no hash.
    cached = _torch_cache(monkeypatch, tmp_path)
    marker = tmp_path / "code_ran"
    torch.save({"conv1.conv.weight": _MakesFolder(str(marker))}, cached)
    with pytest.raises(CheckpointError, match=rf"{cached.name}.*delete it"):
        build_googlenet(3, weights="imagenet")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "name"),
    [(b"<html><body>proxy login</body></html>", "html"), (None, "list"), (b"", "empty")],
)
def test_an_unreadable_cached_imagenet_file_names_itself(monkeypatch, tmp_path, content, name):
    cached = _torch_cache(monkeypatch, tmp_path)
    if content is None:
        torch.save([torch.zeros(1)], cached)
    else:
        cached.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{cached.name}.*delete it and download"):
        build_googlenet(3, weights="imagenet")


class _MakesFolder:
    """Unpickling this creates a folder: evidence that a load ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_invalid_arguments():
    with pytest.raises(ConfigError):
        build_googlenet(1, weights="none")
    with pytest.raises(ConfigError):
        build_googlenet(3, weights="none", freeze="layer4")
