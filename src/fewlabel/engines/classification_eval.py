"""Using a trained grading network: its checkpoint metadata, rebuilding it, predicting batches.

Training (:mod:`fewlabel.engines.classification`) writes checkpoints with
:func:`checkpoint_meta` and validates with :func:`create_evaluator`; ``fewlabel evaluate``
and ``fewlabel predict`` rebuild the network with :func:`model_from_checkpoint` and run the
same evaluator over new images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.handlers import EpochOutputStore
from torch import nn

from fewlabel import __version__
from fewlabel.config.classification import ClassificationExperiment
from fewlabel.engines.checkpoint import version_note
from fewlabel.errors import CheckpointError
from fewlabel.utils.distributed import gather_sharded, is_distributed, rank, world_size
from fewlabel.utils.environment import software_versions
from fewlabel.utils.runtime import autocast

__all__ = [
    "ClassifierOutputs",
    "average_outputs",
    "checkpoint_meta",
    "create_evaluator",
    "evaluate_sharded",
    "model_from_checkpoint",
    "rank_shard",
    "run_evaluator",
]


def checkpoint_meta(
    cfg: ClassificationExperiment,
    classes: Sequence[str],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    **extra: Any,
) -> dict[str, Any]:
    """The metadata stored with every checkpoint: all that prediction needs.

    Args:
        cfg: the resolved experiment config.
        classes: class names in label order.
        channels: channels of the training images as decoded (1 or 3).
        mean: input normalisation mean.
        std: input normalisation standard deviation.
        **extra: more plain values (best metric, epoch...).

    Returns:
        A ``weights_only``-loadable dict.
    """
    return {
        "task": "classification",
        "fewlabel_version": __version__,
        "software": software_versions(),
        "classes": list(classes),
        "image_size": int(cfg.model.image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "channels": int(channels),
        "model": cfg.model.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
        **extra,
    }


def model_from_checkpoint(
    ckpt: dict[str, Any], source: str | Path = "checkpoint"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained network from a checkpoint, without downloading anything.

    Args:
        ckpt: a dict from :func:`fewlabel.engines.checkpoint.load_checkpoint`.
        source: the file name, for error messages.

    Returns:
        ``(model, meta)``, the model in eval mode on the CPU.

    Raises:
        CheckpointError: if the checkpoint is not a classification checkpoint or its weights
            do not fit the architecture recorded in it.
    """
    from fewlabel.networks.googlenet import build_googlenet

    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise CheckpointError(f"{source}: not a fewlabel model checkpoint (no 'model' and 'meta' entries)")
    if meta.get("task") != "classification":
        raise CheckpointError(f"{source}: a {meta.get('task')!r} checkpoint, not a classification one")
    for key in ("classes", "image_size", "mean", "std", "model"):
        if key not in meta:
            raise CheckpointError(f"{source}: checkpoint metadata lacks {key!r}")
    mcfg = meta["model"]
    model = build_googlenet(
        len(meta["classes"]),
        weights="none",
        freeze="none",
        dropout=float(mcfg.get("dropout", 0.4)),
        aux_logits=bool(mcfg.get("aux_logits", True)),
    )
    # Networks trained from ImageNet weights convert their normalised input to torchvision's
    # [-1, 1] convention inside forward(); rebuilding with weights="none" must keep that step.
    model.net.transform_input = mcfg.get("weights", "none") != "none"
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: weights do not fit the recorded GoogLeNet{version_note(meta)}: {err}"
        ) from err
    return model.eval(), meta


@dataclass
class ClassifierOutputs:
    """Everything an evaluation pass produced.

    Attributes:
        probs: ``N x K`` class probabilities.
        labels: ``N`` true labels, or ``None`` for unlabelled images.
        ids: image identifiers.
        loss: mean negative log-likelihood of the true class (``None`` without labels).
    """

    probs: np.ndarray
    labels: np.ndarray | None
    ids: list[str]
    loss: float | None


def create_evaluator(
    model: nn.Module, device: torch.device, amp: bool = False, tta: bool = False, features: bool = False
) -> Engine:
    """An Ignite engine that predicts class probabilities batch by batch.

    Args:
        model: the classifier (``forward`` gives main logits; ``head_forward`` for features).
        device: compute device.
        amp: float16 autocast on CUDA.
        tta: average the softmax over the four 90-degree rotations of each image.
        features: batches hold cached bottleneck ``features`` instead of ``image``.

    Returns:
        The engine; run it with :func:`run_evaluator`.
    """

    @torch.no_grad()
    def step(engine: Engine, batch: dict) -> dict:
        model.eval()
        with autocast(device, amp):
            if features:
                probs = F.softmax(model.head_forward(batch["features"].to(device)).float(), dim=1)
            else:
                x = batch["image"].to(device, non_blocking=True)
                rotations = range(4) if tta else range(1)
                probs = sum(
                    F.softmax(model(torch.rot90(x, k, dims=(-2, -1))).float(), dim=1) for k in rotations
                )
                probs = probs / len(rotations)
        label = batch.get("label")
        return {
            "probs": probs.float().cpu(),
            "label": None if label is None else torch.as_tensor(label).view(-1).cpu(),
            "ids": [str(i) for i in batch.get("id", [""] * len(probs))],
        }

    engine = Engine(step)
    EpochOutputStore().attach(engine, name="collected")
    return engine


def run_evaluator(engine: Engine, loader: Any) -> ClassifierOutputs:
    """Run an evaluator from :func:`create_evaluator` over a loader and gather its outputs.

    Args:
        engine: the evaluator.
        loader: batches of ``{"image" | "features", "label"?, "id"?}``.

    Returns:
        Probabilities, labels, ids and the mean loss.
    """
    engine.run(loader)
    outs = getattr(engine.state, "collected", [])
    if not outs:
        raise ValueError("nothing to evaluate: the data loader is empty")
    probs = torch.cat([o["probs"] for o in outs]).numpy().astype(np.float64)
    ids = [i for o in outs for i in o["ids"]]
    labels = None
    if all(o["label"] is not None for o in outs):
        labels = torch.cat([o["label"] for o in outs]).numpy().astype(np.int64)
    return _outputs(probs, labels, ids)


def average_outputs(outputs: Sequence[ClassifierOutputs]) -> ClassifierOutputs:
    """The outputs of an ensemble: the mean of its members' class probabilities.

    The loss is recomputed on the averaged probabilities (the ensemble's own NLL), not averaged.

    Args:
        outputs: one :func:`run_evaluator` result per model, over the same images in the same order.

    Returns:
        The averaged outputs, with the first member's labels and ids.

    Raises:
        ValueError: if no outputs are given or they cover different images.
    """
    if not outputs:
        raise ValueError("no outputs to average")
    first = outputs[0]
    for other in outputs[1:]:
        if other.ids != first.ids or other.probs.shape != first.probs.shape:
            raise ValueError("ensemble members were run over different images")
    probs = np.mean([o.probs for o in outputs], axis=0)
    return _outputs(probs, first.labels, list(first.ids))


def _outputs(probs: np.ndarray, labels: np.ndarray | None, ids: list[str]) -> ClassifierOutputs:
    loss = None
    if labels is not None:
        # NLL of the (possibly rotation-averaged) probabilities, so TTA and plain runs compare.
        picked = probs[np.arange(len(labels)), labels]
        loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return ClassifierOutputs(probs=probs, labels=labels, ids=ids, loss=loss)


def rank_shard(dataset: Any) -> Any:
    """This rank's validation items: every ``world_size``-th one, from ``rank`` on.

    Args:
        dataset: the whole validation set.

    Returns:
        ``dataset`` itself in a single process, else a ``Subset`` of it.
    """
    if not is_distributed():
        return dataset
    return torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))


def evaluate_sharded(evaluator: Engine, loader: Any, num_classes: int) -> ClassifierOutputs:
    """Run the evaluator on this rank's shard; with several ranks, gather every rank's rows.

    Each rank predicts its own shard (:func:`rank_shard`), and the probabilities and labels of
    all shards are gathered in the dataset's order, so every rank computes the same metrics
    (and takes the same best-checkpoint and early-stopping decisions) as one process would.

    Args:
        evaluator: an engine from :func:`create_evaluator`.
        loader: batches of this rank's shard (a :func:`rank_shard` of the validation set).
        num_classes: number of classes, for the empty shard of a rank with no images.

    Returns:
        The outputs over the whole validation set, in its order (ids are positions).
    """
    if not is_distributed():
        return run_evaluator(evaluator, loader)
    total = len(loader.dataset.dataset)  # the full validation set behind this rank's Subset
    if len(loader.dataset):
        outs = run_evaluator(evaluator, loader)
        probs, labels = torch.from_numpy(outs.probs), torch.from_numpy(outs.labels)
    else:  # fewer validation images than ranks
        probs, labels = torch.zeros((0, num_classes), dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    probs = gather_sharded(probs, total).numpy()
    labels = gather_sharded(labels, total).numpy()
    return _outputs(probs, labels, [str(i) for i in range(total)])
