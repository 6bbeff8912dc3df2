"""Semi-supervised segmentation trainer: transformation-consistent self-ensembling (TCSM).

Li et al., "Transformation-Consistent Self-Ensembling Model for Semi-supervised Medical Image
Segmentation", IEEE TNNLS 2020. A student network f is trained on a labelled batch with the
supervised loss, and on a consistency batch (the unlabelled batch, plus the labelled one when
``apply_to_labeled``) with a consistency loss between ``T(f(x))`` and ``g(T(x))``, where g is
the teacher (an exponential moving average of f) and T a random rotation by k·90°, flip and
optional zoom. The consistency weight ramps up as ``exp(-5 (1 - t)^2)``.

Unlike the authors' code, whose student forward for the consistency term runs under
``torch.no_grad()`` (so that term trains nothing), here both terms back-propagate through the
student; only the teacher's forward is gradient-free.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from copy import deepcopy
from itertools import islice
from typing import Any, Literal

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.engines.workflow import Workflow
from torch import Tensor, nn

from fewlabel.config.segmentation import TCSMConfig
from fewlabel.engines.ramps import sigmoid_rampup
from fewlabel.engines.schedules import load_scheduler_state
from fewlabel.errors import CheckpointError, DataError
from fewlabel.losses.consistency import ConsistencyLoss
from fewlabel.transforms.consistency import InPlaneTransform, apply_per_sample, sample_transforms
from fewlabel.transforms.copy_paste import copy_paste_batch
from fewlabel.utils.distributed import rank, unwrap_model, world_size

__all__ = ["TCSMTrainer"]

_STATE_KEYS = (
    "engine",
    "student",
    "teacher",
    "optimizer",
    "lr_scheduler",
    "scaler",
    "ema_warmup",
    "transform_rng",
)


class TCSMTrainer(Trainer):
    """Mean-teacher trainer with transformation consistency, as a MONAI/Ignite engine.

    It subclasses ``monai.engines.Trainer`` so that MONAI and Ignite handlers (stats, checkpoints,
    validation, early stopping) attach as to ``SupervisedTrainer``; its iteration draws its own
    unlabelled batch, because an Ignite engine iterates over one data source only. The labelled
    loader drives the epochs; the unlabelled loader is cycled independently (a fresh iterator
    whenever it is exhausted).

    Unlabelled position on resume. :meth:`state_dict` saves how many batches the current pass
    over the unlabelled loader has served (``unlabeled_position``); after
    :meth:`load_state_dict` the first fresh iterator skips that many batches, so a resumed run
    is fed the batches an uninterrupted one would be (for a loader that yields the same
    batches on every pass, e.g. a list or an unshuffled ``DataLoader``). A loader whose sampler
    has a ``resume`` method (:class:`fewlabel.data.sampling.ResumableSampler`) is not skipped:
    its owner positions the sampler, which knows the sampler's epoch as well, and skipping
    batches on top would skip them twice. The segmentation pipeline does so
    (``fewlabel.engines.segmentation._resume_sampler``), with an unlabelled loader of exactly
    one epoch's batches. Whoever builds such a loader for a standalone trainer calls
    ``sampler.resume`` itself after loading.

    Iteration ``i`` (Ignite's 1-based ``state.iteration``) uses the consistency weight
    ``tcsm.consistency_weight · sigmoid_rampup(i - 1, tcsm.rampup_iterations)``, so the first
    step has ramp position t = 0. ``state.output`` is
    ``{"loss", "sup_loss", "cons_loss", "cons_weight"}`` (detached tensors and a float), plus
    ``cp_loss`` when copy-paste is on.

    Copy-paste (``tcsm.copy_paste_weight`` > 0, after Bai et al., CVPR 2023). Labelled sample
    i and unlabelled sample i are mixed through a random rectangle
    (:func:`fewlabel.transforms.copy_paste.copy_paste_batch`); the student's output on the
    mixed image takes the supervised loss against the labels where the labelled image shows
    and the teacher's argmax elsewhere. The teacher's prediction is the one the consistency
    term already computed, brought back from T(x) by T⁻¹, so copy-paste costs one more
    student forward and backward over ``min(labelled, unlabelled)`` samples and no teacher
    forward. Its weight follows the consistency ramp, scaled to ``copy_paste_weight``, so an
    untrained teacher's labels carry no weight at first.

    Teacher. It is updated after every optimizer step by Ignite's ``EMAHandler``
    (``teacher = (1 − m)·teacher + m·student`` with ``m = 1 − ema_decay``; buffers such as
    batch-norm statistics are copied from the student). When ``ema_warmup_iterations`` > 0,
    the handler's momentum warm-up moves m linearly from 1 (teacher = student) to
    ``1 − ema_decay`` over that many iterations; its position is saved by :meth:`state_dict`.
    An explicitly given ``teacher`` replaces the handler's own copy (``EMAHandler.ema_model``).
    ``ema_decay == 1`` keeps the teacher frozen at its initial weights; ``ema_decay == 0``
    makes it a copy of the student after each step (``EMAHandler`` only accepts momenta
    strictly inside (0, 1), so these two ends are set up by hand).

    The teacher stays in eval mode: dropout off and batch-norm running statistics, so its
    targets are deterministic and do not depend on the batch composition. The paper's
    teacher-side perturbation is the transformation T itself; the student keeps its dropout.
    The teacher's forward runs under ``torch.no_grad()``, which keeps an iteration at about
    one extra forward pass over the consistency batch.

    Transformations. One T is drawn per sample from the enabled rotations, flips and zooms
    (``fewlabel.transforms.consistency``). For inputs whose in-plane size is not square a
    single T is shared by the batch, because odd quarter turns swap H and W and per-sample
    draws could not be stacked. T acts on the two in-plane axes, so 2D, 2.5D (slab as
    channels) and 3D ``(N, C, H, W, D)`` inputs all work; in 3D the through-plane axis is
    ``plane_axis`` (``input.axis``), usually the coarse slice axis, which no quarter turn may
    swap with a fine in-plane one.

    Reduction to supervised training: with ``tcsm.enabled`` False, or without unlabelled data
    and with ``apply_to_labeled`` False, an iteration is exactly a supervised step
    (``loss = supervised_loss(student(x), y)``), and the teacher still tracks the student.

    The labelled and unlabelled images go through the student in one concatenated batch when
    their shapes allow (batch-norm statistics then span both, as in the mean-teacher
    reference code), else in two forwards.

    Args:
        device: where the batches are moved. ``student`` (and ``teacher``) must already be there.
        max_epochs: epochs to train.
        labeled_loader: iterable of labelled batches (dicts with ``image`` and ``label``).
        unlabeled_loader: iterable of unlabelled batches (dicts with ``image``; a ``label`` is
            ignored), or ``None``.
        student: the network being trained; it outputs logits ``(N, K, ...)``. It may be a
            ``DistributedDataParallel`` wrapper: the teacher and the saved state use the
            wrapped network.
        optimizer: optimizer over the student's parameters.
        supervised_loss: ``loss(logits, label)`` on the labelled batch.
        tcsm: TCSM settings (weights, ramp-up, EMA, transformations).
        epoch_length: iterations per epoch; default ``len(labeled_loader)``.
        teacher: a network with the student's architecture to use as teacher; default a deep
            copy of the student.
        amp: CUDA mixed precision (``torch.autocast`` + ``GradScaler``); ignored off CUDA.
        cpu_amp: bfloat16 autocast when ``device`` is the CPU (no gradient scaling: bfloat16
            has float32's range). Network outputs are cast to float32 before the losses.
        lr_scheduler: optional learning-rate scheduler, stepped as ``scheduler_step`` says.
        seed: seed of the generator that draws the transformations (each rank adds its index).
        scheduler_step: step ``lr_scheduler`` after every ``"iteration"`` or every ``"epoch"``.
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: ``(batch, device, non_blocking, **kwargs) -> (image, label)`` for
            labelled batches (MONAI's default reads the ``image`` and ``label`` keys).
        train_handlers: MONAI/Ignite handlers to attach (after the EMA update, so handlers at
            ``ITERATION_COMPLETED`` see the updated teacher).
        amp_kwargs: extra arguments of ``torch.autocast``.
        plane_axis: for 3D inputs, the spatial axis (0, 1 or 2) that T and the copy-paste
            rectangles leave alone; they act on the other two. Ignored for 2D inputs.

    Raises:
        ValueError: for an unknown ``scheduler_step`` or ``plane_axis``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        labeled_loader: Iterable,
        unlabeled_loader: Iterable | None,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        supervised_loss: Callable[[Tensor, Tensor], Tensor],
        tcsm: TCSMConfig,
        epoch_length: int | None = None,
        teacher: nn.Module | None = None,
        amp: bool = False,
        lr_scheduler: Any | None = None,
        seed: int = 0,
        scheduler_step: Literal["iteration", "epoch"] = "iteration",
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        amp_kwargs: dict | None = None,
        cpu_amp: bool = False,
        plane_axis: int = 2,
    ) -> None:
        if scheduler_step not in ("iteration", "epoch"):
            raise ValueError(f"scheduler_step must be 'iteration' or 'epoch', got {scheduler_step!r}")
        if plane_axis not in (0, 1, 2):
            raise ValueError(f"plane_axis must be 0, 1 or 2, got {plane_axis!r}")
        device = torch.device(device)
        use_amp = bool(amp) and device.type == "cuda"
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=labeled_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            amp=use_amp,
            decollate=False,
            amp_kwargs=amp_kwargs,
        )
        self.cpu_amp = bool(cpu_amp) and device.type == "cpu"
        self.plane_axis = plane_axis
        self.student = student
        self.optimizer = optimizer
        self.supervised_loss = supervised_loss
        self.tcsm = tcsm
        self.lr_scheduler = lr_scheduler
        self.scheduler_step = scheduler_step
        self.consistency_loss = ConsistencyLoss(tcsm.consistency_loss, tcsm.consistency_threshold)
        # Share of pixels the ``ce`` consistency counted in this iteration, for the history.
        self._counted: Tensor | None = None
        self.unlabeled_loader = unlabeled_loader if tcsm.enabled else None
        self._unlabeled_iter: Iterator | None = None
        # Batches served by the current pass over the unlabelled loader, saved for a resume.
        self._unlabeled_served = 0
        # A loaded position the next fresh iterator starts from (None: start from the top).
        self._unlabeled_resume: int | None = None
        self._seed = seed
        # Each rank draws its own transformations and pasted rectangles for its shard; with
        # one seed all ranks would repeat the same draws on their samples.
        self._generator = torch.Generator().manual_seed(seed + rank())
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        self.ema: EMAHandler | None = None
        self.teacher = self._setup_teacher(student, teacher, tcsm)

        if lr_scheduler is not None and scheduler_step == "epoch":
            self.add_event_handler(Events.EPOCH_COMPLETED, lambda _: lr_scheduler.step())
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    @property
    def consistency_active(self) -> bool:
        """Whether iterations compute the consistency term at all."""
        return self.tcsm.enabled and (self.unlabeled_loader is not None or self.tcsm.apply_to_labeled)

    def consistency_weight(self, iteration: int) -> float:
        """The consistency weight used at a 1-based Ignite iteration.

        Args:
            iteration: ``engine.state.iteration`` during the step.

        Returns:
            ``consistency_weight · sigmoid_rampup(iteration - 1, rampup_iterations)``, or 0 when
            the consistency term is off.
        """
        if not self.consistency_active:
            return 0.0
        return self.tcsm.consistency_weight * self._ramp(iteration)

    def copy_paste_weight(self, iteration: int) -> float:
        """The copy-paste weight used at a 1-based Ignite iteration.

        Args:
            iteration: ``engine.state.iteration`` during the step.

        Returns:
            ``copy_paste_weight · sigmoid_rampup(iteration - 1, rampup_iterations)``, or 0 when
            the term is off (no unlabelled data, or TCSM off).
        """
        if not (self.consistency_active and self.unlabeled_loader is not None):
            return 0.0
        return self.tcsm.copy_paste_weight * self._ramp(iteration)

    def _ramp(self, iteration: int) -> float:
        # Both terms share one ramp, so the copy-paste labels gain weight as the teacher does.
        return sigmoid_rampup(iteration - 1, self.tcsm.rampup_iterations)

    def _setup_teacher(self, student: nn.Module, teacher: nn.Module | None, tcsm: TCSMConfig) -> nn.Module:
        momentum = 1.0 - tcsm.ema_decay
        if momentum > 0.0:
            warmup = tcsm.ema_warmup_iterations if momentum < 1.0 else 0
            self.ema = EMAHandler(
                student,
                momentum=momentum if momentum < 1.0 else 0.5,
                momentum_warmup=1.0 if warmup else None,
                warmup_iters=warmup or None,
                handle_buffers="copy",
            )
            # EMAHandler validates 0 < momentum < 1; momentum 1 (a plain copy) is still well defined.
            self.ema.momentum = momentum
            if teacher is not None:
                self.ema.ema_model = teacher
        elif teacher is None:
            teacher = deepcopy(unwrap_model(student))
        teacher = self.ema.ema_model if self.ema is not None else teacher
        assert teacher is not None
        teacher.requires_grad_(False)
        teacher.eval()
        if self.ema is not None:
            # Attached before the user's handlers, so that handlers at ITERATION_COMPLETED
            # (checkpoints, validation) see the teacher of the same step.
            self.ema.attach(self, name="ema_momentum")
        return teacher

    def run(self) -> None:  # type: ignore[override]
        """Train until ``max_epochs``, continuing from the current (possibly loaded) state.

        ``monai.engines.Trainer.run`` would replace the gradient scaler (losing a loaded scale),
        so this calls the workflow's run directly.
        """
        Workflow.run(self)

    def _iteration(self, engine: Engine, batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration")
        image, label = engine.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        if label is None:
            raise DataError(None, "a labelled training batch has no 'label'")
        image, label = _plain(image), _plain(label)
        weight = self.consistency_weight(self.state.iteration)
        unlabeled = (
            self._next_unlabeled() if self.consistency_active and self.unlabeled_loader is not None else None
        )

        self.student.train()
        self.teacher.eval()
        self.optimizer.zero_grad(set_to_none=True)
        cp_loss = None
        self._counted = None
        with self._autocast():
            if self.consistency_active:
                logits, sup_loss, cons_loss, cp_loss = self._tcsm_losses(image, label, unlabeled)
            else:
                logits = self.student(image).float()
                self.fire_event(IterationEvents.FORWARD_COMPLETED)
                sup_loss = self.supervised_loss(logits, label)
                cons_loss = torch.zeros((), device=image.device)
            loss = sup_loss + weight * cons_loss if weight else sup_loss
            if cp_loss is not None:
                loss = loss + self.copy_paste_weight(self.state.iteration) * cp_loss
        self.fire_event(IterationEvents.LOSS_COMPLETED)

        self.scaler.scale(loss).backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None and self.scheduler_step == "iteration":
            self.lr_scheduler.step()
        output = {
            "loss": loss.detach(),
            "sup_loss": sup_loss.detach(),
            "cons_loss": cons_loss.detach(),
            "cons_weight": weight,
        }
        if cp_loss is not None:
            output["cp_loss"] = cp_loss.detach()
        if self._counted is not None:
            output["cons_counted"] = self._counted
        self.state.output = output
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _tcsm_losses(
        self, image: Tensor, label: Tensor, unlabeled: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Labelled logits, supervised, consistency and copy-paste losses of one iteration (inside autocast).

        The copy-paste loss is ``None`` when that term is off.
        """
        n_labeled = image.shape[0]
        joint = unlabeled is not None and image.shape[1:] == unlabeled.shape[1:]
        if unlabeled is None:
            student_inputs = [image]
        elif joint:
            student_inputs = [torch.cat([image, unlabeled])]
        else:
            student_inputs = [image, unlabeled]
        # Consistency pieces: (which student input, which of its samples).
        everything = slice(None)
        if unlabeled is None:
            pieces = [(0, everything)]
        elif joint:
            pieces = [(0, everything if self.tcsm.apply_to_labeled else slice(n_labeled, None))]
        else:
            pieces = [(1, everything)] + ([(0, everything)] if self.tcsm.apply_to_labeled else [])

        # Teacher first: after an EMA update its buffers are the student's, and the student's
        # forward in train mode would already move the batch-norm statistics of this step.
        targets = []
        for which, samples in pieces:
            x = student_inputs[which][samples]
            plane = self._to_plane(x).shape[2:4]
            transforms = sample_transforms(
                x.shape[0],
                rotate90=self.tcsm.rotate90,
                flip=self.tcsm.flip,
                scale=self.tcsm.scale,
                generator=self._generator,
                shared=self.tcsm.rotate90 and plane[0] != plane[1],
            )
            with torch.no_grad():
                targets.append((transforms, self.teacher(self._transform(transforms, x)).float()))

        # float32 outputs: under bfloat16 autocast the losses would otherwise sum in bfloat16.
        outputs = [self.student(x).float() for x in student_inputs]
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        logits = outputs[0][:n_labeled]
        sup_loss = self.supervised_loss(logits, label)
        # A per-sample mean over all pieces (two pieces only when the shapes forbid one batch).
        cons_loss, count, counted = None, 0, None
        for (which, samples), (transforms, target) in zip(pieces, targets, strict=True):
            term = self.consistency_loss(self._transform(transforms, outputs[which][samples]), target)
            term = term * target.shape[0]
            cons_loss = term if cons_loss is None else cons_loss + term
            share = self.consistency_loss.last_counted
            if share is not None:
                share = share * target.shape[0]
                counted = share if counted is None else counted + share
            count += target.shape[0]
        assert cons_loss is not None
        self._counted = None if counted is None else counted / count
        cp_loss = None
        if unlabeled is not None and self.tcsm.copy_paste_weight > 0:
            if not joint:
                raise DataError(
                    None,
                    f"tcsm.copy_paste_weight needs labelled and unlabelled samples of one shape, got "
                    f"{tuple(image.shape[1:])} and {tuple(unlabeled.shape[1:])}; set it to 0 or "
                    "give both the same channels and patch size",
                )
            # Shapes are joint, so there is one piece: the unlabelled samples follow the
            # labelled ones in it when apply_to_labeled, else they are all of it.
            transforms, target = targets[0]
            first = n_labeled if self.tcsm.apply_to_labeled else 0
            n = min(n_labeled, unlabeled.shape[0])
            with torch.no_grad():
                teacher_logits = self._transform(
                    transforms[first : first + n], target[first : first + n], inverse=True
                )
                pseudo = _hard_labels(teacher_logits)
            mixed, mixed_label = copy_paste_batch(
                *(self._to_plane(t) for t in (image[:n], label[:n], unlabeled[:n], pseudo)),
                self.tcsm.copy_paste_size,
                self._generator,
            )
            mixed, mixed_label = self._from_plane(mixed), self._from_plane(mixed_label)
            cp_loss = self.supervised_loss(self.student(mixed).float(), mixed_label)
        return logits, sup_loss, cons_loss / count, cp_loss

    def _to_plane(self, x: Tensor) -> Tensor:
        """``x`` with its through-plane axis last, where T and copy-paste expect it."""
        if x.ndim == 5 and self.plane_axis != 2:
            return x.movedim(2 + self.plane_axis, -1)
        return x

    def _from_plane(self, x: Tensor) -> Tensor:
        """Undo :meth:`_to_plane`."""
        if x.ndim == 5 and self.plane_axis != 2:
            return x.movedim(-1, 2 + self.plane_axis)
        return x

    def _transform(self, transforms: list[InPlaneTransform], x: Tensor, inverse: bool = False) -> Tensor:
        """Apply each sample's T (or its inverse) in the plane that excludes ``plane_axis``."""
        return self._from_plane(apply_per_sample(transforms, self._to_plane(x), inverse=inverse))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", **self.amp_kwargs)
        if self.cpu_amp:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_unlabeled(self) -> Tensor:
        """The next unlabelled image batch, restarting the loader when it is exhausted.

        Returns:
            The image tensor of the batch, on the trainer's device.

        Raises:
            DataError: if the loader yields no batches, or a batch has no image.
        """
        assert self.unlabeled_loader is not None
        for attempt in range(2):
            if self._unlabeled_iter is None:
                self._unlabeled_iter = self._fresh_unlabeled_iter()
            try:
                batch = next(self._unlabeled_iter)
                self._unlabeled_served += 1
                break
            except StopIteration:
                self._unlabeled_iter = None
                if attempt:
                    raise DataError(None, "the unlabelled data loader yields no batches") from None
        if isinstance(batch, dict):
            if "image" not in batch:
                raise DataError(None, f"an unlabelled batch has no 'image' (keys: {sorted(batch)})")
            image = batch["image"]
        elif isinstance(batch, (list, tuple)):
            image = batch[0]
        else:
            image = batch
        return _plain(image).to(device=self.state.device, non_blocking=self.non_blocking, **self.to_kwargs)

    def _fresh_unlabeled_iter(self) -> Iterator:
        """A new iterator over the unlabelled loader, at the loaded position after a resume.

        Returns:
            The iterator, with the loaded position's batches already consumed unless the
            loader's sampler positions itself (see the class docstring).
        """
        assert self.unlabeled_loader is not None
        start, self._unlabeled_resume = self._unlabeled_resume or 0, None
        iterator = iter(self.unlabeled_loader)
        # A positioned sampler already starts where the pass stopped: the count still goes on
        # from there, so that a later checkpoint saves the position within the whole pass.
        self._unlabeled_served = start
        if start and not _positions_itself(self.unlabeled_loader):
            # Consumed without being used; a shorter loader simply ends the pass early.
            deque(islice(iterator, start), maxlen=0)
        return iterator

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to resume: networks, optimizer, scheduler, scaler, counters.

        Holds only tensors and plain values, so the file loads with ``weights_only=True``
        (``fewlabel.engines.checkpoint.load_checkpoint``).

        Returns:
            A dict with keys ``engine`` (Ignite's iteration counter, epoch length, max epochs),
            ``student``, ``teacher``, ``optimizer``, ``lr_scheduler``, ``scaler``,
            ``ema_warmup`` (position of the EMA momentum warm-up), ``transform_rng`` and
            ``unlabeled_position`` (batches the current pass over the unlabelled loader has
            served, an int).
        """
        warmup = getattr(self.ema, "momentum_scheduler", None) if self.ema is not None else None
        return {
            "engine": dict(Engine.state_dict(self)),
            # The bare network's weights: a DistributedDataParallel student would prefix "module.".
            "student": unwrap_model(self.student).state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # Only the position: the scheduler's own state_dict holds its lambda object, which
            # would not load with weights_only=True.
            "ema_warmup": None if warmup is None else {"event_index": int(warmup.event_index)},
            "transform_rng": self._generator.get_state(),
            # Loaded but not yet used, the loaded position is still the current one.
            "unlabeled_position": int(
                self._unlabeled_served if self._unlabeled_resume is None else self._unlabeled_resume
            ),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state saved by :meth:`state_dict`, to continue training with :meth:`run`.

        The iteration counter (and with it the ramp-up and EMA warm-up positions) comes from
        the checkpoint; ``max_epochs`` and ``epoch_length`` stay those of this trainer, so a
        finished run can be extended. The learning-rate scheduler resumes its saved state,
        horizon included: a cosine schedule that has ended climbs again if training goes on,
        so extend runs whose scheduler has no fixed end (or give the loaded one a new one).
        The unlabelled loader continues from the saved position (see the class docstring);
        a checkpoint without ``unlabeled_position`` (older ones) restarts it from its first
        batch.

        Args:
            state_dict: the dict returned by :meth:`state_dict`.

        Raises:
            CheckpointError: if keys are missing or the networks do not match.
        """
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"TCSM trainer state lacks {missing}; was it saved by TCSMTrainer.state_dict()?"
            )
        engine_state = dict(state_dict["engine"])
        engine_state.pop("max_iters", None)
        engine_state["max_epochs"] = self.state.max_epochs
        if self.state.epoch_length is not None:
            engine_state["epoch_length"] = self.state.epoch_length
        try:
            Engine.load_state_dict(self, engine_state)
            unwrap_model(self.student).load_state_dict(state_dict["student"])
            self.teacher.load_state_dict(state_dict["teacher"])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot restore the TCSM trainer: {err}") from err
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.lr_scheduler is not None and state_dict["lr_scheduler"] is not None:
            load_scheduler_state(self.lr_scheduler, state_dict["lr_scheduler"])
        if state_dict["scaler"]:
            self.scaler.load_state_dict(state_dict["scaler"])
        warmup = getattr(self.ema, "momentum_scheduler", None) if self.ema is not None else None
        if warmup is not None and state_dict["ema_warmup"] is not None:
            warmup.event_index = int(state_dict["ema_warmup"]["event_index"])
        self._generator.set_state(state_dict["transform_rng"])
        if world_size() > 1:
            # Only rank 0's generator is saved: restored on every rank, it would make all of
            # them repeat rank 0's draws. Each rank continues on its own stream instead,
            # reproducible for a given seed, rank and resume point.
            self._generator.manual_seed(_rank_stream_seed(self._seed, rank(), int(self.state.iteration)))
        self._unlabeled_iter = None
        self._unlabeled_resume = _pass_position(
            int(state_dict.get("unlabeled_position", 0)), self.unlabeled_loader
        )
        self._unlabeled_served = self._unlabeled_resume


def _positions_itself(loader: Iterable) -> bool:
    """Whether ``loader``'s sampler is resumed by its owner (``ResumableSampler.resume``)."""
    return callable(getattr(getattr(loader, "sampler", None), "resume", None))


def _pass_position(served: int, loader: Iterable | None) -> int:
    """Where a fresh pass should start: ``served`` batches in, or 0 after a complete pass.

    Args:
        served: batches the interrupted pass had served.
        loader: the unlabelled loader (its length, where it has one, ends a pass).

    Returns:
        ``served`` modulo the loader's length; ``served`` itself for a loader without one.
    """
    if served <= 0 or loader is None:
        return 0
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return served
    # A complete pass would restart at its next batch anyway: skipping it would load it for nothing.
    return served % length if length > 0 else 0


def _rank_stream_seed(seed: int, rank_index: int, iteration: int) -> int:
    """A generator seed for one rank after a resume at ``iteration`` (distinct for each)."""
    return (seed * 1_000_003 + rank_index * 7_919 + iteration * 104_729) % (2**63)


def _plain(x: Tensor) -> Tensor:
    # MetaTensor tracks affine metadata through every op; training needs none of it.
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _hard_labels(logits: Tensor) -> Tensor:
    """Integer labels ``(N, 1, ...)``: the most probable class, or logit > 0 for one channel."""
    if logits.shape[1] == 1:
        return (logits > 0).long()
    return logits.argmax(dim=1, keepdim=True)
