"""GoogLeNet (Inception v1) for transfer learning with few labelled images.

torchvision's GoogLeNet gets a new ``num_classes`` head (and new auxiliary heads), its lowest
layers can be frozen (weights *and* BatchNorm statistics, so that a few hundred images cannot
distort generic ImageNet features), and the network exposes its 1024-d bottleneck so that a
head can be trained on cached features.

The wrapper re-implements torchvision's forward pass (same layers, same order) because
torchvision returns a different type in train and eval mode and offers no access to the
bottleneck features.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import GoogLeNet, GoogLeNet_Weights

from fewlabel.engines.checkpoint import load_state_dict_file
from fewlabel.errors import CheckpointError, ConfigError

__all__ = [
    "FREEZE_ORDER",
    "MIN_IMAGE_SIZE",
    "GoogLeNetClassifier",
    "build_googlenet",
    "parameter_groups",
]

# torchvision GoogLeNet's feature layers in forward order; ``freeze`` names the last frozen one.
FREEZE_ORDER = [
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
    "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b",
]  # fmt: skip

# Five stride-2 stages: at 32 pixels the last inception block sees 1x1 maps. Smaller inputs
# still run but are meaningless; training with BatchNorm also needs batches of >= 2 images
# below 47 pixels (a 1x1 map of a single image has no batch statistics; see
# config.classification.MIN_SIZE_FOR_BATCH_OF_ONE).
MIN_IMAGE_SIZE = 32

_HEAD_MODULES = ("fc", "aux1", "aux2")
# A file whose backbone lacks or mismatches any of these is for another architecture.
_CORE_PREFIXES = tuple(f"{name}." for name in FREEZE_ORDER if not name.startswith("maxpool"))


class GoogLeNetClassifier(nn.Module):
    """torchvision GoogLeNet with a new head, layer freezing and bottleneck access.

    Args:
        net: a torchvision ``GoogLeNet`` whose ``fc`` (and ``aux1.fc2``/``aux2.fc2`` when it has
            auxiliary heads) already have ``num_classes`` outputs.
        frozen: names of the children of ``net`` that are frozen.
        pretrained: whether the backbone weights come from ImageNet (for the record).
    """

    def __init__(self, net: GoogLeNet, frozen: list[str], pretrained: bool) -> None:
        super().__init__()
        self.net = net
        self.frozen = list(frozen)
        self.pretrained = pretrained
        self.num_classes = net.fc.out_features
        for name in self.frozen:
            for p in getattr(net, name).parameters():
                p.requires_grad_(False)
        self.train(True)

    @property
    def has_aux(self) -> bool:
        """Whether the auxiliary classifiers exist."""
        return self.net.aux1 is not None

    def train(self, mode: bool = True) -> GoogLeNetClassifier:
        """Set train/eval mode, keeping frozen layers in eval mode.

        Frozen layers stay in eval mode so their BatchNorm running statistics are neither
        updated nor replaced by batch statistics during training.

        Args:
            mode: ``True`` for training.

        Returns:
            ``self``.
        """
        super().train(mode)
        for name in self.frozen:
            getattr(self.net, name).eval()
        return self

    def _stem_to_bottleneck(self, x: Tensor, with_aux: bool) -> tuple[Tensor, list[Tensor]]:
        net = self.net
        x = net._transform_input(x)
        aux: list[Tensor] = []
        for name in FREEZE_ORDER:
            x = getattr(net, name)(x)
            if with_aux and name == "inception4a":
                aux.append(net.aux1(x))
            elif with_aux and name == "inception4d":
                aux.append(net.aux2(x))
        x = torch.flatten(net.avgpool(x), 1)
        return x, aux

    def features(self, x: Tensor) -> Tensor:
        """The bottleneck: ``N x 1024`` features after global average pooling.

        Args:
            x: ``N x 3 x H x W`` normalised images.

        Returns:
            ``N x 1024`` features (before dropout and the classifier).
        """
        return self._stem_to_bottleneck(x, with_aux=False)[0]

    def head_forward(self, feats: Tensor) -> Tensor:
        """Classify bottleneck features (dropout, then the linear head).

        Args:
            feats: ``N x 1024`` output of :meth:`features`.

        Returns:
            ``N x num_classes`` logits.
        """
        return self.net.fc(self.net.dropout(feats))

    def forward(self, x: Tensor) -> Tensor:
        """Main logits, in train and eval mode alike (the auxiliary heads are skipped).

        Args:
            x: ``N x 3 x H x W`` normalised images.

        Returns:
            ``N x num_classes`` logits.
        """
        return self.head_forward(self.features(x))

    def forward_train(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Main and auxiliary logits for the training loss.

        Args:
            x: ``N x 3 x H x W`` normalised images.

        Returns:
            ``(logits, aux_logits)``; ``aux_logits`` holds the two auxiliary heads' logits in
            training mode, and is empty in eval mode or without auxiliary heads.
        """
        feats, aux = self._stem_to_bottleneck(x, with_aux=self.training and self.has_aux)
        return self.head_forward(feats), aux

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new layers: the classifier and the auxiliary heads.

        Returns:
            The parameters (all trainable).
        """
        modules = [getattr(self.net, name) for name in _HEAD_MODULES]
        return [p for m in modules if m is not None for p in m.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable (not frozen) parameters of the pretrained layers.

        Returns:
            The parameters.
        """
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.net.parameters() if p.requires_grad and id(p) not in head]


def _frozen_layers(freeze: str) -> list[str]:
    if freeze == "none":
        return []
    if freeze == "all":
        return list(FREEZE_ORDER)
    if freeze not in FREEZE_ORDER:
        raise ConfigError(f"model.freeze={freeze!r}: expected 'none', 'all' or one of {FREEZE_ORDER}")
    return FREEZE_ORDER[: FREEZE_ORDER.index(freeze) + 1]


def _imagenet_state_dict() -> dict[str, Tensor]:
    url = GoogLeNet_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        # torch.hub checks the hash only when it downloads, and a file copied into the cache by
        # hand, as offline sites do, is read as it is: read it like any local weights file.
        try:
            return load_state_dict_file(cached)
        except CheckpointError as err:
            raise CheckpointError(
                f"model.weights=imagenet: {err}; delete it and download {url} again"
            ) from err
    try:
        return GoogLeNet_Weights.IMAGENET1K_V1.get_state_dict(
            progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            "model.weights=imagenet: cannot obtain torchvision's ImageNet GoogLeNet weights "
            f"({type(err).__name__}: {err}). On a machine without internet access, download {url} "
            f"once into torch's cache ({cached.parent}), or set model.weights to the path of that "
            "file (or any torchvision-layout GoogLeNet state dict)."
        ) from err


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Accept weights saved from this wrapper ("net.") or from DataParallel ("module.").
    for prefix in ("module.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_backbone(net: GoogLeNet, state: dict[str, Tensor], source: str) -> None:
    state = _strip_prefixes(state)
    own = net.state_dict()
    # BatchNorm's step counters are optional: load_state_dict keeps its own when a file lacks them.
    core = [k for k in own if k.startswith(_CORE_PREFIXES) and not k.endswith("num_batches_tracked")]
    missing = [k for k in core if k not in state]
    mismatched = [k for k in core if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} backbone tensors missing (e.g. {missing[0]})")
        if mismatched:
            k = mismatched[0]
            detail.append(
                f"{len(mismatched)} with the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise CheckpointError(
            f"{source}: not torchvision GoogLeNet weights ({'; '.join(detail)}); expected a state dict with keys "
            "such as conv1.conv.weight ... inception5b.branch4.1.bn.running_var"
        )
    # The 1000-class fc and auxiliary fc2 layers do not fit the new head and are skipped.
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    own.update(usable)
    net.load_state_dict(own)


def build_googlenet(
    num_classes: int,
    weights: str = "imagenet",
    freeze: str = "conv3",
    dropout: float = 0.4,
    aux_logits: bool = True,
) -> GoogLeNetClassifier:
    """Build GoogLeNet for ``num_classes`` grades.

    Args:
        num_classes: outputs of the new classifier (>= 2).
        weights: ``"imagenet"`` (torchvision's weights, from its cache or downloaded),
            ``"none"`` (random initialisation, no input transform) or the path of a local
            torchvision-layout GoogLeNet state dict (``.pth``/``.pt``/``.safetensors``).
        freeze: last frozen layer of :data:`FREEZE_ORDER`, ``"none"`` or ``"all"`` (every
            pretrained layer: only the heads train).
        dropout: dropout before the classifier.
        aux_logits: keep the two auxiliary classifiers (trained as new heads).

    Returns:
        The model, in training mode, with frozen layers in eval mode.

    Raises:
        ConfigError: if ``num_classes`` < 2 or ``freeze`` is unknown.
        CheckpointError: if the ImageNet weights cannot be obtained, or a weights file is
            missing, unsafe (pickled objects) or for another architecture.
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    frozen = _frozen_layers(freeze)
    pretrained = weights != "none"
    if pretrained:
        if weights == "imagenet":
            state, source = _imagenet_state_dict(), "ImageNet weights"
        else:
            state, source = load_state_dict_file(weights), str(weights)
        # Built like torchvision's pretrained GoogLeNet: the original weights expect inputs in
        # [-1, 1]; transform_input converts ImageNet-normalised inputs to that range.
        net = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=True, init_weights=False)
        _load_backbone(net, state, source)
    else:
        net = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)

    net.dropout = nn.Dropout(p=dropout)
    net.fc = _new_linear(1024, num_classes)
    if aux_logits:
        net.aux1.fc2 = _new_linear(1024, num_classes)
        net.aux2.fc2 = _new_linear(1024, num_classes)
    else:
        net.aux_logits = False
        net.aux1 = None
        net.aux2 = None
    return GoogLeNetClassifier(net, frozen, pretrained)


def _new_linear(in_features: int, out_features: int) -> nn.Linear:
    # torchvision's GoogLeNet initialisation for its classifiers.
    layer = nn.Linear(in_features, out_features)
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.01, a=-2, b=2)
    nn.init.zeros_(layer.bias)
    return layer


def _is_decayed(module: nn.Module, param_name: str) -> bool:
    # Weight decay on conv/linear weights only: decaying biases or BatchNorm scales just
    # shrinks them without regularising anything.
    return param_name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))


def parameter_groups(
    model: GoogLeNetClassifier, lr_head: float, lr_backbone: float, weight_decay: float
) -> list[dict]:
    """Optimizer parameter groups with separate learning rates for head and backbone.

    Args:
        model: the network.
        lr_head: learning rate of the new heads.
        lr_backbone: learning rate of the unfrozen pretrained layers.
        weight_decay: applied to conv and linear weights; biases and BatchNorm get none.

    Returns:
        Non-empty groups named ``head_decay``, ``head_no_decay``, ``backbone_decay`` and
        ``backbone_no_decay`` (each with ``params``, ``lr``, ``weight_decay`` and ``name``);
        frozen parameters are in none, every trainable parameter in exactly one. Backbone
        groups are absent when the whole backbone is frozen.
    """
    head = {id(p) for p in model.head_parameters()}
    buckets: dict[str, list[nn.Parameter]] = {
        "head_decay": [],
        "head_no_decay": [],
        "backbone_decay": [],
        "backbone_no_decay": [],
    }
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            part = "head" if id(p) in head else "backbone"
            buckets[f"{part}_{'decay' if _is_decayed(module, pname) else 'no_decay'}"].append(p)
    groups = []
    for name, params in buckets.items():
        if params:
            lr = lr_head if name.startswith("head") else lr_backbone
            wd = 0.0 if name.endswith("no_decay") else weight_decay
            groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
    return groups
