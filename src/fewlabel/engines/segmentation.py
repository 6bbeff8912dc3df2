"""Segmentation training: supervised (MONAI ``SupervisedTrainer``) or semi-supervised (TCSM).

One function, :func:`train_segmentation`, wires an Ignite engine with everything a run needs:

- the loss: continuous Dice (+ cross-entropy) from :mod:`fewlabel.losses.continuous_dice`;
- an iteration budget: an epoch is ``train.iterations_per_epoch`` iterations (the loader is
  restarted when it runs out), so runs with different numbers of labels compare;
- the optimizer and a learning-rate schedule stepped every iteration;
- CUDA autocast + gradient scaling when ``train.amp`` and a GPU is used; bfloat16 autocast
  when ``train.cpu_amp`` and training runs on the CPU;
- an ``ignite.handlers.ProgressBar``;
- validation every ``train.val_every`` epochs (and after the last) on WHOLE validation
  studies with :func:`fewlabel.inference.predict_volume`: Dice per class and their mean over
  the foreground classes (``mean_fg_dice``), the model-selection metric. With TCSM the
  student and the EMA teacher are both validated (``tcsm.validate_teacher``) and the better
  one is kept;
- ``checkpoints/best.pt`` (``{"model", "meta"}``) and ``checkpoints/last.pt`` (resumable:
  optimizer, scheduler, engine position, RNG states, history, and the TCSM trainer's own
  state with the teacher), both written atomically;
- ``history.csv`` and ``learning_curves.png`` in the run folder.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from fewlabel import __version__
from fewlabel.config.segmentation import SegmentationExperiment, SegmentationLoss, SegmentationTrain
from fewlabel.engines.checkpoint import load_checkpoint, save_checkpoint
from fewlabel.engines.handlers import ResumableCheckpointer, TrainingHistory
from fewlabel.engines.schedules import load_scheduler_state
from fewlabel.errors import CheckpointError, FewLabelError
from fewlabel.losses.continuous_dice import ContinuousDiceLoss
from fewlabel.runs import RunDir
from fewlabel.utils.distributed import barrier, is_main_process, rank, sum_over_ranks, wrap_model
from fewlabel.utils.environment import software_versions
from fewlabel.utils.runtime import CPUAutocast, rng_state, set_rng_state

log = logging.getLogger(__name__)

__all__ = [
    "BEST_METRIC",
    "TrainingResult",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_meta",
    "train_segmentation",
    "validate_segmentation",
]

BEST_METRIC = "mean_fg_dice"
# Per-iteration trainer outputs averaged into history.csv, in its documented column order.
_LOSS_KEYS = ("loss", "sup_loss", "cons_loss", "cons_weight", "cons_counted", "cp_loss")


@dataclass
class TrainingResult:
    """What a training run produced.

    Attributes:
        best_checkpoint: ``checkpoints/best.pt``.
        last_checkpoint: ``checkpoints/last.pt``.
        best_value: best validation ``mean_fg_dice`` (NaN without validation data).
        model_name: ``student`` or ``teacher``: which network best.pt holds.
        history: one row per epoch.
    """

    best_checkpoint: Path
    last_checkpoint: Path
    best_value: float
    model_name: str
    history: list[dict[str, Any]] = field(default_factory=list)


def build_optimizer(train_cfg: SegmentationTrain, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``.

    Args:
        train_cfg: the ``train`` section.
        params: parameters to optimise.

    Returns:
        Adam, AdamW, or SGD with Nesterov momentum 0.9.
    """
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=train_cfg.lr, momentum=0.9, nesterov=True, weight_decay=train_cfg.weight_decay
    )


def build_loss(loss_cfg: SegmentationLoss) -> ContinuousDiceLoss:
    """The supervised loss of the ``loss`` config section.

    Args:
        loss_cfg: the ``loss`` section.

    Returns:
        Continuous Dice on the softmax of the logits, plus the configured cross-entropy and soft Dice.
    """
    return ContinuousDiceLoss(
        include_background=loss_cfg.include_background,
        softmax=True,
        ce_weight=loss_cfg.ce_weight,
        soft_dice_weight=loss_cfg.soft_dice_weight,
        batch=loss_cfg.batch,
    )


def build_scheduler(
    train_cfg: SegmentationTrain, optimizer: torch.optim.Optimizer, total_iterations: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule named by ``train.scheduler``, stepped once per iteration.

    Args:
        train_cfg: the ``train`` section.
        optimizer: the optimizer.
        total_iterations: ``max_epochs × iterations per epoch``.

    Returns:
        Cosine annealing to zero over the run, a step decay (×0.1 at 1/2 and 3/4 of the run),
        or ``None`` for a constant learning rate.
    """
    total = max(1, total_iterations)
    if train_cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if train_cfg.scheduler == "step":
        milestones = sorted({max(1, total // 2), max(1, (3 * total) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


def checkpoint_meta(
    cfg: SegmentationExperiment, classes: Sequence[str], spatial_dims: int, in_channels: int
) -> dict[str, Any]:
    """Metadata stored with every checkpoint: enough to rebuild, preprocess and predict.

    Args:
        cfg: the resolved experiment config.
        classes: class names, index = label value.
        spatial_dims: spatial dimensions of the studies (3 volumes, 2 images).
        in_channels: network input channels.

    Returns:
        The ``meta`` dict (plain values only).
    """
    return {
        "task": "segmentation",
        "fewlabel_version": __version__,
        "software": software_versions(),
        "classes": list(classes),
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "config": cfg.model_dump(mode="json"),
        "best_metric": BEST_METRIC,
        "best_value": None,
        "model_name": "student",
    }


def validate_segmentation(
    net: nn.Module,
    val_data: Iterable[dict[str, Any]],
    cfg: SegmentationExperiment,
    num_classes: int,
    spatial_dims: int,
    device: torch.device,
    *,
    size_divisor: int = 1,
    amp: bool = False,
) -> dict[str, Any]:
    """Dice of a network on whole validation studies.

    Each study is predicted whole (:func:`fewlabel.inference.predict_volume`), the arg-max
    is compared with the label by :func:`fewlabel.metrics.segmentation.evaluate_case` (the
    same "dice" as the final report: mean slice Dice for volumes, image Dice for 2D), class
    values are averaged over studies ignoring NaN (class absent from both), and
    ``mean_fg_dice`` averages the foreground classes. Scores are taken on the preprocessed
    grid: mapping every prediction back to the source grid, as the report does, would cost an
    inversion per study and validation. With resampling or a foreground crop the values
    therefore differ a little from the report's; they serve to compare models with each other.

    Args:
        net: the network.
        val_data: preprocessed items ``{"image": (C, *spatial), "label": (1, *spatial)}``.
        cfg: the experiment config (input mode, slice size, evaluation options).
        num_classes: classes including background.
        spatial_dims: spatial dimensions of the studies.
        device: where the network runs.
        size_divisor: see :func:`fewlabel.inference.predict_volume`.
        amp: CUDA autocast.

    Returns:
        ``{"mean_fg_dice": float, "dice": {class_index: float}, "cases": int}``; NaN values
        when no study holds any foreground.
    """
    from fewlabel.inference import predict_volume
    from fewlabel.metrics.segmentation import evaluate_case

    per_class: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    cases = 0
    for item in val_data:
        probs = predict_volume(
            net,
            item["image"],
            cfg.input,
            cfg.eval,
            spatial_dims,
            device,
            cfg.preprocess.slice_size,
            size_divisor=size_divisor,
            amp=amp,
        )
        pred = probs.argmax(0).numpy().astype(np.uint8)
        del probs
        gt = np.asarray(_plain(item["label"]))[0].astype(np.uint8)
        scores = evaluate_case(pred, gt, num_classes, spatial_dims=spatial_dims, axis=cfg.input.axis)["dice"]
        for c in per_class:
            value = scores.get(c, scores.get(str(c), math.nan))
            per_class[c].append(float(value))
        cases += 1
    dice = {c: _nanmean(v) for c, v in per_class.items()}
    return {BEST_METRIC: _nanmean(list(dice.values())), "dice": dice, "cases": cases}


def train_segmentation(
    cfg: SegmentationExperiment,
    run: RunDir,
    net: nn.Module,
    train_loader: Iterable,
    val_data: Sequence[dict[str, Any]],
    classes: Sequence[str],
    spatial_dims: int,
    in_channels: int,
    device: torch.device,
    *,
    unlabeled_loader: Iterable | None = None,
    size_divisor: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> TrainingResult:
    """Train a segmentation network and keep the best one.

    Args:
        cfg: the resolved experiment config.
        run: the run folder (checkpoints, history and curves are written there).
        net: the (student) network; moved to ``device``.
        train_loader: batches ``{"image": (N, C, ...), "label": (N, 1, ...)}`` of labelled samples.
            A loader whose sampler has ``resume(epoch, samples_done)``
            (:class:`fewlabel.data.sampling.ResumableSampler`) continues exactly where an
            interrupted run stopped; the same goes for ``unlabeled_loader``.
        val_data: preprocessed whole validation studies (see :func:`validate_segmentation`);
            empty: no validation, best.pt is the last model (the teacher with TCSM and
            ``tcsm.validate_teacher``, else the student).
        classes: class names, index = label value.
        spatial_dims: spatial dimensions of the studies (3 volumes, 2 images).
        in_channels: network input channels (stored in the checkpoint metadata).
        device: where to train.
        unlabeled_loader: unlabelled batches ``{"image": ...}`` for TCSM (``tcsm.enabled``).
        size_divisor: network input multiple, for whole-study validation.
        resume: continue from ``checkpoints/last.pt``.
        progress: show an Ignite progress bar.

    Returns:
        The :class:`TrainingResult`.

    Raises:
        CheckpointError: if ``resume`` and there is no usable ``last.pt``.
        FewLabelError: if the loss becomes NaN/infinite, or the training set is empty.
    """
    net = net.to(device)
    # DistributedDataParallel under torchrun (the bare network alone); checkpoints keep `net`.
    train_net = wrap_model(net, device, sync_bn=True)
    epoch_length = cfg.train.iterations_per_epoch or _length(train_loader)
    if not epoch_length:
        raise FewLabelError("the labelled training set is empty: nothing to train on")
    max_epochs = cfg.train.max_epochs
    total_iterations = max_epochs * epoch_length
    amp = bool(cfg.train.amp and device.type == "cuda")
    cpu_amp = bool(cfg.train.cpu_amp and device.type == "cpu")
    optimizer = build_optimizer(cfg.train, net.parameters())
    scheduler = build_scheduler(cfg.train, optimizer, total_iterations)
    loss_fn = build_loss(cfg.loss)
    tcsm_trainer = None
    if cfg.tcsm.enabled:
        from fewlabel.engines.tcsm import TCSMTrainer

        if unlabeled_loader is None and not cfg.tcsm.apply_to_labeled:
            log.warning("tcsm.enabled but there are no unlabelled studies: training is supervised only")
        trainer = tcsm_trainer = TCSMTrainer(
            device=device,
            max_epochs=max_epochs,
            labeled_loader=train_loader,
            unlabeled_loader=unlabeled_loader,
            student=train_net,
            optimizer=optimizer,
            supervised_loss=loss_fn,
            tcsm=cfg.tcsm,
            epoch_length=epoch_length,
            amp=amp,
            lr_scheduler=scheduler,
            seed=cfg.run.seed,
            cpu_amp=cpu_amp,
            plane_axis=cfg.input.axis,
        )
        scheduler_owned_by_trainer = True
    else:
        from monai.engines import SupervisedTrainer

        trainer = SupervisedTrainer(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_loader,
            # MONAI autocasts on CUDA only; on the CPU the network carries its own autocast.
            network=CPUAutocast(train_net) if cpu_amp else train_net,
            optimizer=optimizer,
            loss_function=loss_fn,
            epoch_length=epoch_length,
            amp=amp,
            decollate=False,
        )
        scheduler_owned_by_trainer = False

    meta = checkpoint_meta(cfg, classes, spatial_dims, in_channels)
    state = _RunState(run=run, meta=meta)
    history = TrainingHistory(run.path)
    ckpt_dir = run.checkpoints
    if is_main_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    def models() -> dict[str, nn.Module]:
        out = {"student": net}
        if tcsm_trainer is not None and cfg.tcsm.validate_teacher:
            out["teacher"] = tcsm_trainer.teacher
        return out

    def resumable_payload(
        engine: Engine, sums: tuple[dict[str, float], float] | None = None
    ) -> dict[str, Any]:
        epoch_sums, epoch_count = sums if sums is not None else (state.epoch_sums, state.epoch_count)
        payload: dict[str, Any] = {
            "model": net.state_dict(),
            "engine": {
                "iteration": int(engine.state.iteration),
                "epoch_length": int(epoch_length),
                "max_epochs": int(max_epochs),
            },
            "rng_state": rng_state(),
            "history": state.history,
            # The running sums of the epoch so far, for its train_loss row after a mid-epoch resume.
            "epoch_sums": dict(epoch_sums),
            "epoch_count": int(epoch_count),
            "best": {"value": state.best_value, "model_name": state.best_model, "epoch": state.best_epoch},
            "meta": meta,
        }
        if tcsm_trainer is not None:
            # Holds the optimizer, scheduler, scaler, teacher and ramp-up position too.
            payload["trainer"] = tcsm_trainer.state_dict()
        else:
            payload["optimizer"] = optimizer.state_dict()
            payload["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            payload["scaler"] = _scaler_state(trainer)
        return payload

    checkpointer = ResumableCheckpointer(ckpt_dir, cfg.train.checkpoint.keep_last)

    def save_last(engine: Engine, sums: tuple[dict[str, float], float] | None = None) -> None:
        if not is_main_process():
            return  # under torchrun only rank 0 writes
        checkpointer.save(resumable_payload(engine, sums), engine.state.iteration)

    def save_mid_epoch(engine: Engine) -> None:
        # An epoch's last iteration is saved by _epoch_completed, once its history row, its
        # validation and any new best are in: saved here, before them, last.pt would hold the
        # previous epoch's history and best, and a resumed run would lose that row and could
        # let a worse model replace best.pt.
        if engine.state.iteration % epoch_length:
            # Every rank adds its part, so the checkpoint holds the whole batch's sums so far
            # (rank 0 alone takes them up again on resume).
            save_last(engine, _sum_over_ranks(state.epoch_sums, state.epoch_count))

    if resume and not (ckpt_dir / "last.pt").is_file():
        # Stopped before its first checkpoint (Ctrl-C in epoch 1): nothing was kept, so
        # resuming is starting again, as grading does; the user need not know the difference.
        log.warning("%s not found: nothing to resume from, training from the start", ckpt_dir / "last.pt")
        start_iteration = 0
    elif resume:
        start_iteration = _restore(
            ckpt_dir / "last.pt",
            net,
            optimizer,
            scheduler,
            tcsm_trainer,
            state,
            trainer,
            epoch_length,
            max_epochs,
        )
        for loader in (train_loader, unlabeled_loader):
            _resume_sampler(loader, start_iteration, epoch_length)
    else:
        start_iteration = 0

    if not scheduler_owned_by_trainer and scheduler is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_started(engine: Engine) -> None:
        # An epoch resumed part-way continues the sums of its first iterations (restored once).
        state.epoch_sums, state.epoch_count = state.resumed_sums or {}, state.resumed_count
        state.resumed_sums, state.resumed_count = None, 0
        state.epoch_start = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _accumulate(engine: Engine) -> None:
        output = engine.state.output
        loss = _scalar(output["loss"])
        if not math.isfinite(loss):
            raise FewLabelError(
                f"the training loss became {loss} at iteration {engine.state.iteration}; "
                f"lower train.lr (now {cfg.train.lr}) or check the labels"
            )
        state.epoch_count += 1
        for key in _LOSS_KEYS:
            if key in output:
                state.epoch_sums[key] = state.epoch_sums.get(key, 0.0) + _scalar(output[key])

    if cfg.train.checkpoint.every_n_iterations:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(every=cfg.train.checkpoint.every_n_iterations), save_mid_epoch
        )

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_completed(engine: Engine) -> None:
        epoch = engine.state.epoch
        sums, count = _sum_over_ranks(state.epoch_sums, state.epoch_count)
        row: dict[str, Any] = {"epoch": epoch, "iteration": engine.state.iteration}
        # In the documented column order, whatever order the sums came back from the ranks in.
        for key in _LOSS_KEYS:
            if key in sums:
                row["train_loss" if key == "loss" else key] = sums[key] / max(1.0, count)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["seconds"] = round(time.perf_counter() - state.epoch_start, 2)
        # Under torchrun rank 0 validates alone (the others go on and wait for it at the next
        # gradient all-reduce): only its best.pt and history are written.
        if val_data and is_main_process() and (epoch % cfg.train.val_every == 0 or epoch == max_epochs):
            _validate_and_keep_best(engine, row)
        elif not val_data:
            # No validation studies: the newest model is the best one there is. With TCSM that
            # is the teacher, the temporal ensemble of the student (what mean-teacher methods report).
            name = "teacher" if "teacher" in models() else "student"
            _save_best(engine, models()[name], name, math.nan, epoch)
        state.history.append(row)
        if is_main_process():
            _write_history(history, state.history, plot=("val_dice" in row) or epoch == max_epochs)
        save_last(engine)

    def _validate_and_keep_best(engine: Engine, row: dict[str, Any]) -> None:
        epoch = engine.state.epoch
        results = {
            name: validate_segmentation(
                model, val_data, cfg, len(classes), spatial_dims, device, size_divisor=size_divisor, amp=amp
            )
            for name, model in models().items()
        }
        name = max(results, key=lambda n: _orderable(results[n][BEST_METRIC]))
        chosen = results[name]
        row["val_dice"] = chosen[BEST_METRIC]
        if len(results) > 1:
            for n, r in results.items():
                row[f"val_dice_{n}"] = r[BEST_METRIC]
        for c, value in chosen["dice"].items():
            row[f"val_dice_{classes[c]}"] = value
        summary = ", ".join(f"{n} {r[BEST_METRIC]:.4f}" for n, r in results.items())
        log.info("epoch %d/%d: validation mean foreground Dice: %s", epoch, max_epochs, summary)
        if state.improves(chosen[BEST_METRIC]):
            _save_best(engine, models()[name], name, chosen[BEST_METRIC], epoch)

    def _save_best(engine: Engine, model: nn.Module, name: str, value: float, epoch: int) -> None:
        state.best_value, state.best_model, state.best_epoch = value, name, epoch
        best_meta = dict(
            meta, best_value=None if math.isnan(value) else float(value), model_name=name, epoch=epoch
        )
        if is_main_process():
            save_checkpoint({"model": model.state_dict(), "meta": best_meta}, ckpt_dir / "best.pt")
        if not math.isnan(value):
            log.info("epoch %d: new best %s %.4f (%s) saved", epoch, BEST_METRIC, value, name)

    # A bar redrawn every iteration only helps on a terminal; in a log file it would add a
    # line per iteration, and the per-epoch log lines already report progress there.
    if progress and is_main_process() and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(
            trainer,
            output_transform=lambda out: {"loss": _scalar(out["loss"])} if isinstance(out, dict) else {},
        )

    if start_iteration >= total_iterations:
        log.info("training had already finished (iteration %d); nothing left to train", start_iteration)
    else:
        trainer.run()

    best_path = ckpt_dir / "best.pt"
    barrier()  # the other ranks may read rank 0's checkpoints once they are written
    if is_main_process() and not best_path.is_file():  # pragma: no cover - every completed epoch writes it
        raise CheckpointError(f"{best_path}: training finished without a best checkpoint")
    return TrainingResult(
        best_checkpoint=best_path,
        last_checkpoint=ckpt_dir / "last.pt",
        best_value=state.best_value,
        model_name=state.best_model,
        history=state.history,
    )


@dataclass
class _RunState:
    run: RunDir
    meta: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float = math.nan
    best_model: str = "student"
    best_epoch: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_count: int = 0
    resumed_sums: dict[str, float] | None = None
    resumed_count: int = 0
    epoch_start: float = 0.0
    saved_best: bool = False

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (the first validation always counts)."""
        if not self.saved_best:
            self.saved_best = True
            return True
        return _orderable(value) > _orderable(self.best_value)


def _restore(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tcsm_trainer: Any,
    state: _RunState,
    trainer: Engine,
    epoch_length: int,
    max_epochs: int,
) -> int:
    ckpt = load_checkpoint(path)
    engine_state = ckpt.get("engine", {})
    if engine_state.get("epoch_length") != epoch_length:
        raise CheckpointError(
            f"{path}: saved with {engine_state.get('epoch_length')} iterations per epoch, "
            f"but the run now has {epoch_length}; resume needs the same data and config"
        )
    try:
        if tcsm_trainer is not None:
            if "trainer" not in ckpt:
                raise CheckpointError(f"{path}: was written by supervised training, the config enables TCSM")
            tcsm_trainer.load_state_dict(ckpt["trainer"])
        else:
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                load_scheduler_state(scheduler, ckpt["scheduler"])
            _restore_scaler_at_start(trainer, ckpt.get("scaler"))
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: does not match this model/optimizer: {err}") from err
    state.history = list(ckpt.get("history", []))
    best = ckpt.get("best", {})
    state.best_value = float(best.get("value", math.nan))
    state.best_model = best.get("model_name", "student")
    state.best_epoch = int(best.get("epoch", 0))
    state.saved_best = (path.parent / "best.pt").is_file()
    if "rng_state" in ckpt:
        set_rng_state(ckpt["rng_state"])
    iteration = int(engine_state.get("iteration", 0))
    if iteration % epoch_length and rank() == 0:
        # The sums are over all ranks already (save_mid_epoch): taken up once, by rank 0.
        state.resumed_sums = {k: float(v) for k, v in ckpt.get("epoch_sums", {}).items()}
        state.resumed_count = int(ckpt.get("epoch_count", 0))
    # Ignite's own method: trainers such as TCSMTrainer override load_state_dict with their full state.
    Engine.load_state_dict(
        trainer, {"iteration": iteration, "max_epochs": max_epochs, "epoch_length": epoch_length}
    )
    log.info("resuming from %s at iteration %d (epoch %d)", path, iteration, iteration // epoch_length)
    return iteration


def _scaler_state(trainer: Engine) -> dict[str, Any] | None:
    scaler = getattr(trainer, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def _restore_scaler_at_start(trainer: Engine, state: dict[str, Any] | None) -> None:
    """Give a resumed ``SupervisedTrainer`` the gradient scale it had when it was saved.

    MONAI's ``Trainer.run`` creates a fresh ``GradScaler`` each time it starts, so a scale
    loaded before ``run`` would be replaced; without it a resumed CUDA AMP run starts again
    from 2**16 and skips its first optimizer steps on overflowing gradients while it recalibrates.

    Args:
        trainer: the trainer about to run.
        state: the saved ``GradScaler.state_dict()``; None or empty (no AMP) does nothing.
    """
    if not state:
        return

    def _load(engine: Engine) -> None:
        if getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(state)

    trainer.add_event_handler(Events.STARTED, _load)


def _resume_sampler(loader: Any, iteration: int, epoch_length: int) -> None:
    """Let a resumable sampler skip what the interrupted run had consumed (one batch per iteration)."""
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if hasattr(sampler, "resume") and batch_size:
        sampler.resume(iteration // epoch_length, (iteration % epoch_length) * batch_size)


def _write_history(history: TrainingHistory, rows: list[dict[str, Any]], plot: bool) -> None:
    # The rows live in last.pt too, so a resumed run rewrites exactly the epochs it kept.
    history.rows = [dict(r) for r in rows]
    history.write(plot=False)
    if plot:
        from fewlabel.reports.plots import plot_learning_curves

        # Positions, schedules and shares (iteration, seconds, consistency weight, counted
        # pixels) stay in the CSV only.
        hidden = ("iteration", "seconds", "cons_weight", "cons_counted")
        curves = [{k: v for k, v in row.items() if k not in hidden} for row in rows]
        plot_learning_curves(curves, history.png_path)


def _length(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _sum_over_ranks(sums: dict[str, float], count: int) -> tuple[dict[str, float], float]:
    """An epoch's loss sums and iteration count, added up over all ranks.

    Each rank's losses are means over its own shard of the global batch; without this,
    ``history.csv`` would show rank 0's shard alone and differ from a one-process run.

    Args:
        sums: this rank's per-key sums of the iteration losses.
        count: this rank's number of iterations.

    Returns:
        The summed ``sums`` (same keys) and count; the inputs themselves in one process.
    """
    keys = sorted(sums)  # every rank logs the same keys, so the packing agrees
    total, *values = sum_over_ranks([float(count), *(sums[k] for k in keys)])
    return dict(zip(keys, values, strict=True)), total


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def _plain(value: Any) -> Any:
    as_tensor: Callable | None = getattr(value, "as_tensor", None)
    value = as_tensor() if callable(as_tensor) else value
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _orderable(value: float | None) -> float:
    # NaN means that neither the labels nor the prediction hold any foreground: nothing to find
    # and nothing falsely found, which ranks as a perfect score (a false positive scores 0).
    if value is None:
        return -math.inf
    return 1.0 if math.isnan(value) else float(value)
