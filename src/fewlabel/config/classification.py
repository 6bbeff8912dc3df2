"""Schema of a retinopathy (image classification) experiment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fewlabel.config.common import (
    CheckpointConfig,
    ExperimentModel,
    OptimizerName,
    RunConfig,
    SchedulerName,
    StrictModel,
    check_distinct_classes,
    check_folds,
)

# The lowest layers of torchvision's GoogLeNet, in forward order; ``freeze`` names the last frozen one.
FreezePoint = Literal[
    "none",
    "conv1",
    "conv2",
    "conv3",
    "inception3a",
    "inception3b",
    "inception4a",
    "inception4b",
    "inception4c",
    "inception4d",
    "inception4e",
    "inception5a",
    "inception5b",
    "all",
]


#: Smallest input size at which GoogLeNet trains on batches of one image (batch norm).
MIN_SIZE_FOR_BATCH_OF_ONE = 47


class ClassificationData(StrictModel):
    """Where the images are and how they are split.

    Attributes:
        format: ``folder`` (``root/<class>/*.png|jpg``), ``csv`` (``image,label[,patient_id]``)
            or ``npz`` (MedMNIST layout), or ``auto`` to infer from ``path``.
        path: the folder, CSV or ``.npz`` file.
        image_root: folder that relative CSV image paths are relative to (default: the CSV's folder).
        classes: class names in grade order; ``None`` takes folder names (sorted) or the sorted labels.
        val_fraction: share of cases for validation when the data has no official split (unused
            with ``folds``).
        test_fraction: share of cases for testing when the data has no official split.
        folds: k-fold cross-validation: the cases outside the test split are cut into this many
            folds (by patient, stratified, seeded); 0 turns it off. Not with an official split.
        fold: with ``folds``, the fold that validates (``0`` to ``folds - 1``); the others train.
        use_official_split: use the ``train/val/test`` split stored in an ``.npz`` file.
        class_balance: ``none``, ``weighted_loss`` (inverse-frequency class weights) or ``sampler``.
        num_workers: data-loading worker processes.
        cache: keep decoded images in memory after the first epoch.
    """

    format: Literal["auto", "folder", "csv", "npz"] = "auto"
    path: str
    image_root: str | None = None
    classes: list[str] | None = None
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    folds: int = Field(0, ge=0)
    fold: int = Field(0, ge=0)
    use_official_split: bool = True
    class_balance: Literal["none", "weighted_loss", "sampler"] = "none"
    num_workers: int = Field(0, ge=0)
    cache: bool = True

    @model_validator(mode="after")
    def _fractions(self) -> ClassificationData:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave cases for training (< 1)")
        check_distinct_classes(self.classes)
        check_folds(self.folds, self.fold)
        return self


class GoogLeNetConfig(StrictModel):
    """The GoogLeNet transfer-learning model.

    Attributes:
        name: only ``googlenet``.
        weights: ``imagenet`` (torchvision's ImageNet weights), ``none`` (random init) or the path
            of a local state-dict file (``.pth``/``.pt``/``.safetensors``) for offline sites.
        freeze: last frozen layer, counted from the input; ``conv3`` freezes the stem through the
            second convolution block (generic edge/colour features), ``all`` freezes every
            pretrained layer, ``none`` fine-tunes everything.
        dropout: dropout before the new classification head.
        aux_logits: train GoogLeNet's two auxiliary classifiers too (ignored at evaluation).
        aux_weight: weight of each auxiliary loss.
        image_size: network input size in pixels (images are resized to it).
    """

    name: Literal["googlenet"] = "googlenet"
    weights: str = "imagenet"
    freeze: FreezePoint = "conv3"
    dropout: float = Field(0.4, ge=0.0, lt=1.0)
    aux_logits: bool = True
    aux_weight: float = Field(0.3, ge=0.0)
    image_size: int = Field(224, ge=32, le=1024)


class ClassificationAugment(StrictModel):
    """Training-time augmentation.

    Attributes:
        rotate90: random rotation by 0/90/180/270 degrees (fundus images have no canonical
            orientation; the rotation never changes pixel values, so colour is untouched).
        flip: also random horizontal flips (off by default to follow the original recipe).
    """

    rotate90: bool = True
    flip: bool = False


class ClassificationTrain(StrictModel):
    """Optimisation.

    Attributes:
        mode: ``finetune`` trains the whole unfrozen network; ``bottleneck`` extracts features
            once with the frozen backbone and trains only the head; ``bottleneck_then_finetune``
            does both, fine-tuning from the trained head.
        max_epochs: fine-tuning epochs.
        bottleneck_epochs: head-training epochs on cached features.
        batch_size: images per batch.
        optimizer: ``sgd`` (momentum 0.9, Nesterov), ``adam`` or ``adamw``.
        lr_head: learning rate of the new head.
        lr_backbone: learning rate of the pretrained, unfrozen layers (lower than the head's).
        weight_decay: L2 penalty on weights.
        scheduler: ``cosine``, ``step`` or ``none``.
        warmup_epochs: raise the learning rates linearly from 10% over the first epochs before the
            schedule starts (stabilises training from scratch at high rates).
        label_smoothing: cross-entropy label smoothing (0 disables it).
        mixup_alpha: mixup while fine-tuning: each training image is blended with another of
            its batch, and the one-hot labels alike, with weights drawn from
            ``Beta(alpha, alpha)`` (0 disables it; 0.2-0.4 is usual). Not applied to the
            bottleneck stage, which trains on cached features.
        amp: mixed precision on CUDA (ignored on CPU).
        val_every: validate every N epochs.
        best_metric: validation metric that picks the best checkpoint: ``auto`` (quadratic
            weighted kappa for more than two grades, AUC for two), ``kappa``, ``auc``,
            ``accuracy``, ``balanced_accuracy``, or ``loss``.
        early_stopping_patience: stop after this many validations without improvement (0: never).
        checkpoint: crash-safe checkpointing.
    """

    mode: Literal["finetune", "bottleneck", "bottleneck_then_finetune"] = "finetune"
    max_epochs: int = Field(20, ge=1)
    bottleneck_epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: OptimizerName = "sgd"
    lr_head: float = Field(1e-2, gt=0.0)
    lr_backbone: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    scheduler: SchedulerName = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup_alpha: float = Field(0.0, ge=0.0)
    amp: bool = True
    val_every: int = Field(1, ge=1)
    best_metric: Literal["auto", "kappa", "auc", "accuracy", "balanced_accuracy", "loss"] = "auto"
    early_stopping_patience: int = Field(0, ge=0)
    checkpoint: CheckpointConfig = CheckpointConfig()


class ClassificationEval(StrictModel):
    """Evaluation options.

    Attributes:
        tta_rotations: average predictions over the four 90-degree rotations.
        gallery_size: how many most-confidently-wrong images the report shows.
    """

    tta_rotations: bool = False
    gallery_size: int = Field(12, ge=0)


class ClassificationExperiment(ExperimentModel):
    """A whole classification experiment."""

    task: Literal["classification"]
    run: RunConfig = RunConfig()
    data: ClassificationData
    model: GoogLeNetConfig = GoogLeNetConfig()
    augment: ClassificationAugment = ClassificationAugment()
    train: ClassificationTrain = ClassificationTrain()
    eval: ClassificationEval = ClassificationEval()

    @model_validator(mode="after")
    def _batch_norm_has_values(self) -> ClassificationExperiment:
        # Below 47 pixels GoogLeNet's last feature maps are 1x1, and batch norm in training
        # mode cannot normalise a single value per channel. The bottleneck mode trains only the
        # linear classifier on features extracted in eval mode: no batch norm trains.
        if (
            self.train.batch_size == 1
            and self.model.image_size < MIN_SIZE_FOR_BATCH_OF_ONE
            and self.train.mode != "bottleneck"
        ):
            raise ValueError(
                f"train.batch_size: 1 needs model.image_size of at least {MIN_SIZE_FOR_BATCH_OF_ONE} "
                f"(got {self.model.image_size}): GoogLeNet's last feature maps are then 1x1 and "
                "batch norm cannot train on one value per channel; use a batch of 2 or more"
            )
        return self
