"""Training GoogLeNet for retinopathy grading on Ignite engines.

:func:`train_classifier` runs one or two *stages*, chosen by ``train.mode``:

- ``finetune``: the unfrozen layers and the new head train on images. The loss is
  ``CE(main) + aux_weight * (CE(aux1) + CE(aux2))`` when the auxiliary heads are on;
  validation always scores the main logits.
- ``bottleneck``: the backbone is treated as frozen whatever ``model.freeze`` says. Its
  1024-d features are extracted ONCE per image (see :mod:`fewlabel.engines.bottleneck`) and cached in
  ``features/{train,val}.pt``; the head then trains on them for ``train.bottleneck_epochs``,
  which costs milliseconds per epoch instead of a pass through the network.
- ``bottleneck_then_finetune``: the bottleneck stage, then fine-tuning (with the layers left
  unfrozen by ``model.freeze``) starting from the trained head. A randomly initialised head
  sends large gradients into pretrained layers during the first fine-tuning epochs; training
  it first on frozen features avoids that.

Training steps and validation are plain ``ignite.engine.Engine`` objects rather than MONAI's
``SupervisedTrainer``: the steps need GoogLeNet's auxiliary logits, a feature-only variant
for the bottleneck stage, test-time rotations, and direct access to the gradient scaler for
checkpoints, which would leave little of ``SupervisedTrainer`` but its constructor.

Every epoch records ``history.csv`` / ``learning_curves.png``; validation (every
``train.val_every`` epochs and after the last) computes
:func:`fewlabel.metrics.classification.classification_metrics` (the evaluator comes from
:mod:`fewlabel.engines.classification_eval`), keeps ``checkpoints/best.pt``
by ``train.best_metric`` and feeds Ignite's ``EarlyStopping``. ``checkpoints/last.pt`` holds
everything needed to resume (optimizer, scheduler, scaler, engine position, RNG states, the
best value so far, early-stopping counters); it is written at every epoch end and, with
``train.checkpoint.every_n_iterations``, every N iterations.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from ignite.metrics import Average
from torch import nn

from fewlabel.config.classification import (
    MIN_SIZE_FOR_BATCH_OF_ONE,
    ClassificationExperiment,
    ClassificationTrain,
)
from fewlabel.data.classification import same_grades
from fewlabel.data.sampling import ResumableSampler
from fewlabel.engines.bottleneck import (
    FEATURES_DIR,
    FeatureDataset,
    cached_features,
    extract_features,
    feature_fingerprint,
)
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.engines.classification_eval import (
    checkpoint_meta,
    create_evaluator,
    evaluate_sharded,
    rank_shard,
)
from fewlabel.engines.handlers import ResumableCheckpointer, TrainingHistory
from fewlabel.engines.schedules import load_scheduler_state
from fewlabel.errors import CheckpointError, ConfigError, FewLabelError
from fewlabel.metrics.classification import best_metric_key, classification_metrics, is_better
from fewlabel.runs import RunDir
from fewlabel.transforms.mixup import mixup_batch
from fewlabel.utils.distributed import (
    barrier,
    is_main_process,
    per_rank_batch_size,
    rank,
    world_size,
    wrap_model,
)
from fewlabel.utils.runtime import autocast, rng_state, set_rng_state

log = logging.getLogger(__name__)

__all__ = [
    "BEST_CHECKPOINT",
    "AuxiliaryLoss",
    "TrainingResult",
    "build_optimizer",
    "build_scheduler",
    "inverse_frequency_weights",
    "train_classifier",
]

BEST_CHECKPOINT = "best.pt"
_STAGES = {
    "finetune": ["finetune"],
    "bottleneck": ["bottleneck"],
    "bottleneck_then_finetune": ["bottleneck", "finetune"],
}
_HEAD_GROUPS = ("head_decay", "head_no_decay")


# --------------------------------------------------------------------------- building blocks


class AuxiliaryLoss(nn.Module):
    """GoogLeNet's training loss: ``CE(main) + aux_weight * sum(CE(aux_i))``.

    Args:
        weight: optional per-class weights of the cross-entropy (class balancing).
        aux_weight: weight of each auxiliary classifier's loss.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self, weight: torch.Tensor | None = None, aux_weight: float = 0.3, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.aux_weight = aux_weight

    def forward(
        self, logits: torch.Tensor, aux: Sequence[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: main logits, ``N x K``.
            aux: auxiliary logits (possibly empty).
            target: class indices, ``N``, or class probabilities, ``N x K`` (mixup targets).

        Returns:
            The scalar loss.
        """
        loss = self.ce(logits.float(), target)
        for a in aux:
            loss = loss + self.aux_weight * self.ce(a.float(), target)
        return loss


def inverse_frequency_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class weights ``n / (K * count_c)`` (1 for a perfectly balanced set).

    Args:
        labels: training labels.
        num_classes: number of classes ``K``.

    Returns:
        A float tensor of ``K`` weights; classes absent from ``labels`` get 0 (they never
        contribute to the loss anyway).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.as_tensor(weights, dtype=torch.float32)


def _train_sampler(labels: Sequence[int], num_classes: int, seed: int, balanced: bool) -> ResumableSampler:
    # A ResumableSampler makes the order and every augmentation a function of (seed, epoch,
    # position), so a resumed run replays exactly what an uninterrupted one would have seen.
    weights = None
    if balanced:
        # Every class is drawn equally often on average: each sample weighs 1 / (its class count).
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
        weights = [1.0 / counts[int(y)] for y in labels]
    # Each rank draws its share of the same global order, so N processes see the batches one would.
    return ResumableSampler(
        len(labels), seed=seed, shuffle=True, weights=weights, num_replicas=world_size(), rank=rank()
    )


class _Bound(nn.Module):
    """A method of the classifier exposed as ``forward``, for ``DistributedDataParallel``.

    DDP averages gradients only for computations that run through its own ``forward``, while
    training calls ``forward_train`` (main and auxiliary logits) or ``head_forward`` (cached
    features). Only ``owners`` are registered, so DDP synchronises exactly their parameters.
    """

    def __init__(self, method: Callable[..., Any], *owners: nn.Module) -> None:
        super().__init__()
        self.owners = nn.ModuleList(owners)
        self.method = method

    def forward(self, *args: Any) -> Any:
        return self.method(*args)


def build_optimizer(groups: list[dict], cfg: ClassificationTrain) -> torch.optim.Optimizer:
    """Create the optimizer named by ``train.optimizer``.

    Args:
        groups: parameter groups (each with its own ``lr`` and ``weight_decay``).
        cfg: the ``train`` section.

    Returns:
        SGD (momentum 0.9, Nesterov), Adam or AdamW.
    """
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.9, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr_head)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr_head)
    raise ConfigError(f"train.optimizer={cfg.optimizer!r}: expected sgd, adam or adamw")  # pragma: no cover


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, epochs: int, warmup_epochs: int = 0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Create the per-epoch learning-rate schedule.

    Args:
        optimizer: the optimizer.
        name: ``cosine``, ``step`` (x0.1 after each third of the epochs) or ``none``. Cosine
            runs over ``epochs`` steps towards 1% of the smallest rate the groups have when it
            is built; the last epoch trains one step before that floor. Under a warm-up the
            rates are already at 10% then, so the floor is 0.1% of the configured rate. The
            RetinaMNIST results were measured with this schedule, so it is kept as it is.
        epochs: epochs of the stage.
        warmup_epochs: linear warm-up from 10% of the rates over these epochs, then ``name``
            over the remaining epochs.

    Returns:
        The scheduler (stepped once per epoch), or ``None``.
    """
    warmup_epochs = min(warmup_epochs, max(0, epochs - 1))
    if warmup_epochs > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_epochs)
        rest = build_scheduler(optimizer, name, epochs - warmup_epochs) or torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _: 1.0
        )
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, rest], milestones=[warmup_epochs])
    if name == "cosine":
        eta_min = min(g["lr"] for g in optimizer.param_groups) * 0.01
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=eta_min)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(epochs / 3)), gamma=0.1)
    return None


# --------------------------------------------------------------------------- training


def selectable_metric(metric: str, val_labels: Sequence[int], classes: Sequence[str]) -> str:
    """The selection metric, or ``loss`` when the validation split makes it undefined.

    AUC needs both a grade and another one to rank, and kappa is undefined when the truth and
    the predictions are one grade; with one grade in the validation split every epoch would
    score ``n/a``, ``best.pt`` would stay at the first epoch and early stopping would fire.

    Args:
        metric: the resolved ``train.best_metric``.
        val_labels: the validation images' class indices.
        classes: the class names.

    Returns:
        ``metric``, or ``loss`` with a warning.
    """
    present = sorted(set(val_labels))
    if metric in ("auc", "kappa") and len(present) < 2:
        log.warning(
            "the validation split holds one grade only (%s): %s is undefined on it, so the best "
            "checkpoint is selected by the validation loss instead",
            ", ".join(classes[i] for i in present),
            metric,
        )
        return "loss"
    return metric


def warn_random_frozen_layers(cfg: ClassificationExperiment) -> bool:
    """Warn when fine-tuning would keep randomly initialised layers frozen.

    ``model.freeze`` defaults to ``conv3`` for pretrained weights; with ``model.weights: none``
    those layers would stay random. The bottleneck modes warn about random features already.

    Args:
        cfg: the experiment.

    Returns:
        Whether a warning was given.
    """
    if cfg.model.weights != "none" or cfg.model.freeze == "none" or cfg.train.mode != "finetune":
        return False
    log.warning(
        "model.weights is none but model.freeze=%s: the frozen layers keep their random "
        "initialisation; set model.freeze: none to train them",
        cfg.model.freeze,
    )
    return True


@dataclass
class TrainingResult:
    """What :func:`train_classifier` produced.

    Attributes:
        best_checkpoint: ``checkpoints/best.pt``.
        last_checkpoint: ``checkpoints/last.pt``.
        best_metric: the selection metric (``None`` without a validation split).
        best_value: its best value (``None`` when never defined).
        best_epoch: epoch (counted over all stages) of the best checkpoint.
        history: the per-epoch rows of ``history.csv``.
    """

    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: str | None
    best_value: float | None
    best_epoch: int | None
    history: list[dict] = field(default_factory=list)


@dataclass
class _Context:
    """State shared by the stages of one training run."""

    cfg: ClassificationExperiment
    run: RunDir
    model: nn.Module
    device: torch.device
    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metric: str | None
    history: TrainingHistory
    last: ResumableCheckpointer
    best_value: float | None = None
    best_epoch: int | None = None
    best_saved: bool = False
    total_iterations: int = 0

    @property
    def amp(self) -> bool:
        return bool(self.cfg.train.amp and self.device.type == "cuda")

    def meta(self, **extra: Any) -> dict[str, Any]:
        return checkpoint_meta(self.cfg, self.classes, self.channels, self.mean, self.std, **extra)


def train_classifier(
    cfg: ClassificationExperiment,
    run: RunDir,
    dataset: Any,
    device: torch.device,
    resume: bool = False,
) -> TrainingResult:
    """Train a GoogLeNet classifier as configured, writing checkpoints and history to ``run``.

    Args:
        cfg: the experiment config.
        run: the run folder (exists; holds ``config.yaml``).
        dataset: a :class:`fewlabel.data.classification.ClassificationDataset`.
        device: compute device.
        resume: continue from ``checkpoints/last.pt`` when it exists.

    Returns:
        Paths of the checkpoints and the best validation value.

    Raises:
        CheckpointError: if ``last.pt`` exists but cannot be loaded or does not match.
    """
    from fewlabel.data.classification_transforms import normalization_for
    from fewlabel.networks.googlenet import build_googlenet

    classes = list(dataset.classes)
    mean, std = normalization_for(cfg.model.weights)
    model = build_googlenet(
        len(classes), cfg.model.weights, cfg.model.freeze, cfg.model.dropout, cfg.model.aux_logits
    ).to(device)
    warn_random_frozen_layers(cfg)
    has_val = bool(dataset.splits.get("val"))
    metric = best_metric_key(cfg.train.best_metric, len(classes)) if has_val else None
    if metric is not None:
        metric = selectable_metric(metric, [int(r["label"]) for r in dataset.splits["val"]], classes)
    if not has_val:
        log.warning("no validation images: best.pt will be the model after the last epoch")
    if is_main_process():
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        cfg=cfg,
        run=run,
        model=model,
        device=device,
        classes=classes,
        channels=int(dataset.channels),
        mean=tuple(mean),
        std=tuple(std),
        metric=metric,
        history=TrainingHistory(run.path),
        last=ResumableCheckpointer(run.checkpoints, cfg.train.checkpoint.keep_last),
    )

    stages = _STAGES[cfg.train.mode]
    state: dict[str, Any] | None = None
    if resume:
        state = _load_resume_state(ctx, stages)
    start_stage = stages.index(state["stage"]) if state else 0

    for index, stage in enumerate(stages):
        if index < start_stage:
            continue
        stage_state = state if (state and index == start_stage) else None
        if stage_state and stage_state.get("stage_done") and not _stage_goes_on(cfg, stage, stage_state):
            # The next stage draws from the random streams as they were when this one ended,
            # as in a run never stopped.
            set_rng_state(stage_state["rng"])
            continue
        epoch_offset = _epoch_offset(cfg, stages, index)
        if stage == "bottleneck":
            _run_bottleneck_stage(ctx, dataset, epoch_offset, stage_state)
        else:
            if index > 0 and stage_state is None:
                _start_from_best(ctx)
            _run_finetune_stage(ctx, dataset, epoch_offset, stage_state)

    best_path = run.checkpoints / BEST_CHECKPOINT
    # Rank 0 writes the checkpoints; the other ranks may read them only once it is done.
    barrier()
    if is_main_process() and not best_path.is_file():  # pragma: no cover - written at the first validation
        raise CheckpointError(f"{best_path}: training finished without writing a best checkpoint")
    return TrainingResult(
        best_checkpoint=best_path,
        last_checkpoint=ctx.last.path,
        best_metric=metric,
        best_value=ctx.best_value,
        best_epoch=ctx.best_epoch,
        history=list(ctx.history.rows),
    )


def _start_from_best(ctx: _Context) -> None:
    """Begin fine-tuning from the best bottleneck epoch's classifier, not the last one's.

    The bottleneck stage may have overfitted the head by its last epoch; validation chose the
    epoch to keep, so fine-tuning continues from that one. Without validation the last epoch
    is the best there is and nothing changes.
    """
    path = ctx.run.checkpoints / BEST_CHECKPOINT
    barrier()  # rank 0 writes best.pt; every rank reads it
    if ctx.best_value is None or not path.is_file():
        return
    ckpt = load_checkpoint(path)
    if ckpt.get("meta", {}).get("stage") != "bottleneck":
        # A crash after fine-tuning's first best.pt but before its last.pt resumes here with
        # a best.pt that is already fine-tuned; the bottleneck head is gone, so start from
        # the model as it is.
        return
    ctx.model.load_state_dict(ckpt["model"])
    log.info("fine-tuning starts from the classifier of epoch %s (the best bottleneck epoch)", ctx.best_epoch)


def _stage_epochs(cfg: ClassificationExperiment) -> dict[str, int]:
    return {"bottleneck": cfg.train.bottleneck_epochs, "finetune": cfg.train.max_epochs}


def _epoch_offset(cfg: ClassificationExperiment, stages: list[str], index: int) -> int:
    lengths = _stage_epochs(cfg)
    return sum(lengths[s] for s in stages[:index])


def _resume_position(engine_state: dict[str, Any], epoch_length: int) -> tuple[int, int]:
    """``(completed epochs, iterations done in the next one)`` of a saved engine position.

    The iterations done are counted in the saved epoch's length, so a run resumed on another
    number of processes (whose epochs may have another length at small image sizes) goes on
    in the epoch it was in; an epoch already complete at the new length is counted as done.
    """
    epoch = int(engine_state["epoch"])
    iteration = int(engine_state.get("iteration", 0))
    if not iteration:
        return epoch, 0
    saved_length = int(engine_state.get("epoch_length") or epoch_length)
    done = iteration - epoch * saved_length
    if done >= epoch_length:
        return epoch + 1, 0
    return epoch, max(done, 0)


def _stage_goes_on(cfg: ClassificationExperiment, stage: str, state: dict[str, Any]) -> bool:
    """Whether a stage saved as done has epochs left: the run resumes with a larger epoch count.

    A stage stopped early stays done; so does one from a checkpoint that predates the flag.
    """
    early = state.get("early_stopped", True)
    return not early and int(state["engine"]["epoch"]) < _stage_epochs(cfg)[stage]


def _load_resume_state(ctx: _Context, stages: list[str]) -> dict[str, Any] | None:
    path = ctx.last.path
    if not path.is_file():
        log.warning("%s not found: nothing to resume from, training from the start", path)
        return None
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta", {})
    if meta.get("classes") != ctx.classes and same_grades(meta.get("classes") or [], ctx.classes):
        ctx.classes = list(meta["classes"])  # 0.0, 1.0... from an earlier release: the run keeps its names
    if meta.get("classes") != ctx.classes:
        raise CheckpointError(
            f"{path}: saved for classes {meta.get('classes')}, the data now has {ctx.classes}"
        )
    if ckpt.get("stage") not in stages:
        raise CheckpointError(
            f"{path}: saved in stage {ckpt.get('stage')!r}, not part of train.mode={ctx.cfg.train.mode!r}"
        )
    try:
        ctx.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the configured model: {err}") from err
    best = ckpt.get("best", {})
    ctx.best_value = best.get("value")
    ctx.best_epoch = best.get("epoch")
    ctx.best_saved = (ctx.run.checkpoints / BEST_CHECKPOINT).is_file()
    ctx.total_iterations = int(ckpt.get("total_iterations", 0))
    ctx.history.load(upto=int(ckpt.get("global_epoch", 0)))
    log.info("resuming %s from stage %s, epoch %s", ctx.run.path, ckpt["stage"], ckpt["engine"]["epoch"])
    return ckpt


def _loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    sampler: Any = None,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    device: torch.device | None = None,
) -> Any:
    from monai.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def _image_loaders(ctx: _Context, dataset: Any) -> tuple[Any, Any | None]:
    from fewlabel.data.classification_transforms import (
        build_augment_transforms,
        build_decode_transforms,
        make_dataset,
    )

    cfg = ctx.cfg
    train_records = dataset.splits["train"]
    decode = build_decode_transforms(cfg.model.image_size)
    train_ds = make_dataset(
        train_records,
        decode,
        build_augment_transforms(True, cfg.augment, ctx.mean, ctx.std),
        cache=cfg.data.cache,
        seed=cfg.run.seed,
    )
    generator = torch.Generator().manual_seed(cfg.run.seed)
    labels = [int(r["label"]) for r in train_records]
    sampler = _train_sampler(labels, len(ctx.classes), cfg.run.seed, cfg.data.class_balance == "sampler")
    batch_size = per_rank_batch_size(cfg.train.batch_size)
    train_loader = _loader(
        train_ds,
        batch_size,
        True,
        cfg.data.num_workers,
        sampler,
        generator,
        # A lone last image would give BatchNorm a batch of one 1x1 map at small input sizes;
        # otherwise every image trains, and the epoch length does not depend on the rank count.
        drop_last=(
            cfg.model.image_size < MIN_SIZE_FOR_BATCH_OF_ONE
            and len(sampler) % batch_size == 1
            and len(sampler) > 1
        ),
        device=ctx.device,
    )
    val_loader = None
    if dataset.splits.get("val"):
        val_ds = make_dataset(
            dataset.splits["val"],
            decode,
            build_augment_transforms(False, cfg.augment, ctx.mean, ctx.std),
            cache=cfg.data.cache,
        )
        val_loader = _loader(
            rank_shard(val_ds), cfg.train.batch_size, False, cfg.data.num_workers, device=ctx.device
        )
    return train_loader, val_loader


def _finite_loss(loss: torch.Tensor, engine: Engine, cfg: ClassificationExperiment) -> float:
    """The step's loss as a float; a NaN or infinite loss stops training with advice.

    Raises:
        FewLabelError: when the loss is not finite (diverged rates, or broken images).
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FewLabelError(
            f"the training loss became {value} at iteration {engine.state.iteration}; lower "
            f"train.lr_head / train.lr_backbone (now {cfg.train.lr_head} / {cfg.train.lr_backbone}) "
            "or check the images"
        )
    return value


def _criterion(ctx: _Context, labels: Sequence[int], aux_weight: float) -> AuxiliaryLoss:
    weight = None
    if ctx.cfg.data.class_balance == "weighted_loss":
        weight = inverse_frequency_weights(labels, len(ctx.classes)).to(ctx.device)
        log.info("class weights: %s", [round(float(w), 3) for w in weight])
    return AuxiliaryLoss(
        weight=weight, aux_weight=aux_weight, label_smoothing=ctx.cfg.train.label_smoothing
    ).to(ctx.device)


def _run_finetune_stage(ctx: _Context, dataset: Any, epoch_offset: int, state: dict[str, Any] | None) -> None:
    cfg = ctx.cfg
    from fewlabel.networks.googlenet import parameter_groups

    train_loader, val_loader = _image_loaders(ctx, dataset)
    groups = parameter_groups(ctx.model, cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.weight_decay)
    optimizer = build_optimizer(groups, cfg.train)
    criterion = _criterion(ctx, [int(r["label"]) for r in dataset.splits["train"]], cfg.model.aux_weight)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    model, device = ctx.model, ctx.device
    # DistributedDataParallel under torchrun (BatchNorm synchronised on CUDA); the bare pass alone.
    forward_train = wrap_model(_Bound(model.forward_train, model), device, sync_bn=True)
    mixup_alpha = cfg.train.mixup_alpha

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].view(-1)
        if mixup_alpha > 0:
            # Labels still on the host: the range check and the one-hot targets cost no device sync.
            x, y = mixup_batch(x, y, len(ctx.classes), mixup_alpha)
        y = y.to(device, non_blocking=True)
        with autocast(device, ctx.amp):
            logits, aux = forward_train(x)
        loss = criterion(logits, aux, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return {"loss": _finite_loss(loss, engine, cfg)}

    evaluator = create_evaluator(model, device, amp=ctx.amp) if val_loader is not None else None
    _run_stage(
        ctx,
        "finetune",
        step,
        train_loader,
        val_loader,
        evaluator,
        optimizer,
        scaler,
        cfg.train.max_epochs,
        epoch_offset,
        state,
    )


def _run_bottleneck_stage(
    ctx: _Context, dataset: Any, epoch_offset: int, state: dict[str, Any] | None
) -> None:
    from fewlabel.data.classification_transforms import build_classification_transforms, make_dataset
    from fewlabel.networks.googlenet import parameter_groups

    cfg = ctx.cfg
    model, device = ctx.model, ctx.device
    if cfg.model.weights == "none":
        log.warning(
            "bottleneck training on a randomly initialised backbone: its features carry little "
            "information (set model.weights to imagenet or a weights file)"
        )
    eval_tf = build_classification_transforms(cfg.model.image_size, False, cfg.augment, ctx.mean, ctx.std)
    rotations = 4 if cfg.augment.rotate90 else 1
    folder = ctx.run.path / FEATURES_DIR

    def features_of(split: str, rot: int) -> dict[str, Any]:
        records = dataset.splits[split]

        def make() -> dict[str, Any]:
            log.info(
                "extracting bottleneck features of %d %s images (%d rotation(s))", len(records), split, rot
            )
            ds = make_dataset(records, eval_tf, None, cache=False)
            loader = _loader(ds, cfg.train.batch_size, False, cfg.data.num_workers, device=device)
            return extract_features(model, loader, device, rotations=rot, amp=ctx.amp)

        preprocessing = {"image_size": cfg.model.image_size, "mean": list(ctx.mean), "std": list(ctx.std)}
        fingerprint = feature_fingerprint(model, records, preprocessing)
        return cached_features(folder / f"{split}.pt", records, make, rot, fingerprint)

    train_feats = features_of("train", rotations)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    labels = [int(v) for v in train_feats["labels"]]
    sampler = _train_sampler(labels, len(ctx.classes), cfg.run.seed, cfg.data.class_balance == "sampler")
    train_loader = _loader(
        FeatureDataset(
            train_feats["features"], train_feats["labels"], train_feats["ids"], random_rotation=True
        ),
        per_rank_batch_size(cfg.train.batch_size),
        True,
        0,
        sampler,
        generator,
    )
    val_loader = evaluator = None
    if dataset.splits.get("val"):
        val_feats = features_of("val", 1)
        val_loader = _loader(
            rank_shard(
                FeatureDataset(
                    val_feats["features"], val_feats["labels"], val_feats["ids"], random_rotation=False
                )
            ),
            cfg.train.batch_size,
            False,
            0,
        )
        evaluator = create_evaluator(model, device, amp=ctx.amp, features=True)

    # Only the main classifier sees bottleneck features; the auxiliary heads hang off
    # intermediate layers and stay untouched here (they train during fine-tuning).
    head_ids = {id(p) for p in model.net.fc.parameters()}
    groups = []
    for g in parameter_groups(model, cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.weight_decay):
        if g["name"] in _HEAD_GROUPS:
            params = [p for p in g["params"] if id(p) in head_ids]
            if params:
                groups.append({**g, "params": params})
    optimizer = build_optimizer(groups, cfg.train)
    criterion = _criterion(ctx, labels, 0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    head_forward = wrap_model(_Bound(model.head_forward, model.net.fc), device)

    def step(engine: Engine, batch: dict) -> dict:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        f = batch["features"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True).view(-1)
        with autocast(device, ctx.amp):
            logits = head_forward(f)
        loss = criterion(logits, [], y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return {"loss": _finite_loss(loss, engine, cfg)}

    _run_stage(
        ctx,
        "bottleneck",
        step,
        train_loader,
        val_loader,
        evaluator,
        optimizer,
        scaler,
        cfg.train.bottleneck_epochs,
        epoch_offset,
        state,
        progress=False,
    )


def _run_stage(
    ctx: _Context,
    stage: str,
    step: Callable[[Engine, dict], dict],
    train_loader: Any,
    val_loader: Any | None,
    evaluator: Engine | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_epochs: int,
    epoch_offset: int,
    state: dict[str, Any] | None,
    progress: bool = True,
) -> None:
    cfg = ctx.cfg
    if len(train_loader) == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: no complete training batch; lower it")
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, max_epochs, cfg.train.warmup_epochs)
    trainer = Engine(step)
    train_loss = Average(output_transform=lambda out: out["loss"])
    train_loss.attach(trainer, "train_loss")
    # The loss sum and count of an epoch interrupted part-way, continued after resuming.
    resumed_loss: dict[str, Any] = {}
    mode = "min" if ctx.metric == "loss" else "max"
    current: dict[str, float] = {}
    stopper = None
    if cfg.train.early_stopping_patience > 0 and evaluator is not None:
        stopper = EarlyStopping(
            cfg.train.early_stopping_patience,
            score_function=lambda _engine: current["score"],
            trainer=trainer,
            mode=mode,
        )
    stopped = {"early": False}

    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            load_scheduler_state(scheduler, state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if stopper is not None and state.get("early_stopping"):
            stopper.load_state_dict(state["early_stopping"])
        engine_state = dict(state["engine"])
        epoch, done = _resume_position(engine_state, len(train_loader))
        if epoch >= max_epochs:
            return
        position = {"iteration": epoch * len(train_loader) + done} if done else {"epoch": epoch}
        trainer.load_state_dict({**position, "max_epochs": max_epochs, "epoch_length": len(train_loader)})
        iteration = position.get("iteration", 0)
        sampler = getattr(train_loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            # Iterations count global batches whatever the number of processes; the sampler
            # counts this rank's samples, so a run may resume on a different number of processes.
            sampler.resume(epoch=epoch, samples_done=done * cfg.train.batch_size // world_size())
        saved_loss = state.get("train_loss") or {}
        # One process's running sum: with several, each rank holds its own and only rank 0's is saved.
        if iteration and saved_loss.get("world_size") == 1 and world_size() == 1:
            resumed_loss.update(saved_loss)
        set_rng_state(state["rng"])

    def lrs() -> dict[str, float]:
        out: dict[str, float] = {}
        for g in optimizer.param_groups:
            part = "head" if str(g.get("name", "head")).startswith("head") else "backbone"
            out.setdefault(f"lr_{part}", float(g["lr"]))
        return out

    def save_last(engine: Engine, at_epoch_end: bool) -> None:
        if not is_main_process():
            return
        ctx.last.save(
            {
                "model": ctx.model.state_dict(),
                "meta": ctx.meta(
                    best_metric=ctx.metric, best_value=ctx.best_value, epoch=epoch_offset + engine.state.epoch
                ),
                "stage": stage,
                "stage_done": at_epoch_end and (engine.state.epoch >= max_epochs or stopped["early"]),
                "early_stopped": stopped["early"],
                # An iteration inside an epoch resumes there; at an epoch end, at the next epoch.
                "engine": {
                    "epoch": engine.state.epoch if at_epoch_end else engine.state.epoch - 1,
                    "iteration": 0 if at_epoch_end else engine.state.iteration,
                    "epoch_length": engine.state.epoch_length,
                },
                "global_epoch": epoch_offset
                + (engine.state.epoch if at_epoch_end else engine.state.epoch - 1),
                "total_iterations": ctx.total_iterations,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "scaler": scaler.state_dict(),
                "early_stopping": stopper.state_dict() if stopper is not None else {},
                "best": {"value": ctx.best_value, "epoch": ctx.best_epoch},
                "rng": rng_state(),
                "train_loss": {
                    "sum": float(train_loss.accumulator),
                    "count": int(train_loss.num_examples),
                    "world_size": world_size(),
                },
            },
            ctx.total_iterations,
        )

    @trainer.on(Events.EPOCH_STARTED)
    def _continue_train_loss(engine: Engine) -> None:
        # Runs after Average's own reset at the epoch start: an epoch resumed part-way then
        # reports the mean over all its iterations, as the uninterrupted run does.
        if resumed_loss:
            train_loss.accumulator = train_loss.accumulator + resumed_loss.pop("sum")
            train_loss.num_examples += int(resumed_loss.pop("count"))
            resumed_loss.clear()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _count(engine: Engine) -> None:
        ctx.total_iterations += 1

    every = cfg.train.checkpoint.every_n_iterations
    if every > 0:

        @trainer.on(Events.ITERATION_COMPLETED(every=every))
        def _save_mid_epoch(engine: Engine) -> None:
            # The epoch-end save below covers the last iteration of an epoch.
            if engine.state.iteration % engine.state.epoch_length:
                save_last(engine, at_epoch_end=False)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end_of_epoch(engine: Engine) -> None:
        epoch = engine.state.epoch
        global_epoch = epoch_offset + epoch
        row: dict[str, Any] = {
            "stage": stage,
            "epoch": global_epoch,
            "train_loss": engine.state.metrics["train_loss"],
        }
        row.update(lrs())
        validate = evaluator is not None and (epoch % cfg.train.val_every == 0 or epoch == max_epochs)
        improved = False
        if validate:
            outs = evaluate_sharded(evaluator, val_loader, len(ctx.classes))
            m = classification_metrics(outs.labels, outs.probs, ctx.classes)
            m["loss"] = outs.loss
            for key in ("loss", "accuracy", "balanced_accuracy", "kappa", "auc"):
                row[f"val_{key}"] = m[key]
            value = m[ctx.metric]
            improved = is_better(ctx.metric, value, ctx.best_value)
            if stopper is not None:
                current["score"] = (
                    float(value) if value is not None else (-math.inf if mode == "max" else math.inf)
                )
                stopper(engine)
                stopped["early"] = engine.should_terminate
            if improved:
                ctx.best_value = float(value)
            log.info(
                "%s epoch %d/%d: train loss %.4f, val loss %.4f, val %s %s%s",
                stage,
                epoch,
                max_epochs,
                row["train_loss"],
                outs.loss,
                ctx.metric,
                "n/a" if value is None else f"{value:.4f}",
                " (best)" if improved else "",
            )
        else:
            log.info("%s epoch %d/%d: train loss %.4f", stage, epoch, max_epochs, row["train_loss"])
        if improved or (evaluator is None) or (validate and not ctx.best_saved):
            # Without validation the latest model is the best available; with it, a metric
            # that is undefined at the first validation still needs a checkpoint to exist.
            ctx.best_epoch = global_epoch
            if is_main_process():
                save_checkpoint(
                    {
                        "model": ctx.model.state_dict(),
                        "meta": ctx.meta(
                            best_metric=ctx.metric, best_value=ctx.best_value, epoch=global_epoch, stage=stage
                        ),
                    },
                    ctx.run.checkpoints / BEST_CHECKPOINT,
                )
            ctx.best_saved = True
        if scheduler is not None:
            scheduler.step()
        # Redrawing the PNG costs ~0.5 s: about ten times per stage, and at its end.
        last_epoch = epoch >= max_epochs or engine.should_terminate
        plot = last_epoch or epoch % max(1, max_epochs // 10) == 0
        if is_main_process():
            ctx.history.append(row, plot=plot)
        else:
            ctx.history.rows.append(dict(row))
        save_last(engine, at_epoch_end=True)

    # A bar redrawn every iteration only helps on a terminal; in a log file it would add a
    # line per iteration, and the per-epoch log lines already report progress there.
    if progress and is_main_process() and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False, desc=stage).attach(
            trainer, output_transform=lambda out: {"loss": out["loss"]}
        )
    trainer.run(train_loader, max_epochs=max_epochs)
