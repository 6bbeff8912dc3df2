"""Schema of a segmentation experiment: supervised, or semi-supervised with TCSM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

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


class SegmentationData(StrictModel):
    """Where the studies are and which of them keep their labels.

    Attributes:
        format: ``msd`` (``dataset.json`` + ``imagesTr/ labelsTr/ imagesTs/``, optional
            ``unlabeled`` list), ``csv`` (``image,label,patient_id``; empty label = unlabelled),
            ``slices2d`` (``images/`` + ``masks/`` folders of 2D PNG/JPG slices), or ``auto``.
        path: dataset folder or CSV file.
        image_root: folder that relative CSV paths are relative to (default: the CSV's folder).
        unlabeled_path: extra folder of unlabelled images/studies (e.g. ``covid_semiseg/unlabeled``).
        test_path: a separate labelled test set in the same format as ``path``.
        classes: class names, index = label value (0 is background); ``None`` takes the
            ``labels`` map of ``dataset.json`` or ``[background, lesion]``.
        val_fraction: share of labelled patients held out for validation (unused with
            ``folds``).
        test_fraction: share of labelled patients held out for testing (when no ``test_path``).
        folds: k-fold cross-validation: the labelled patients outside the test set are cut into
            this many folds (seeded, the same for every fold of one seed); 0 turns it off.
        fold: with ``folds``, the fold that validates (``0`` to ``folds - 1``); the others train.
        labeled_fraction: share of the remaining training patients that keep their labels;
            the others become unlabelled (for TCSM). Chosen by patient, seeded.
        labeled_count: number of training cases that keep labels (overrides ``labeled_fraction``).
        num_workers: data-loading worker processes.
        cache: cache preprocessed volumes in memory (MONAI ``CacheDataset``).
    """

    format: Literal["auto", "msd", "csv", "slices2d"] = "auto"
    path: str
    image_root: str | None = None
    unlabeled_path: str | None = None
    test_path: str | None = None
    classes: list[str] | None = None
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    folds: int = Field(0, ge=0)
    fold: int = Field(0, ge=0)
    labeled_fraction: float = Field(1.0, gt=0.0, le=1.0)
    labeled_count: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    cache: bool = True

    @model_validator(mode="after")
    def _fractions(self) -> SegmentationData:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave cases for training (< 1)")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError("classes needs at least background and one foreground class")
        check_distinct_classes(self.classes)
        check_folds(self.folds, self.fold)
        return self


class Preprocess(StrictModel):
    """Intensity and geometry preprocessing (MONAI transforms).

    Attributes:
        modality: ``ct`` (window in Hounsfield units), ``mr`` (z-score per volume) or ``image``
            (8-bit images, scaled to [0, 1]).
        window: CT window ``[low, high]`` in HU mapped to [0, 1] (clipped), e.g. lung ``[-1000, 400]``.
        orientation: reorient volumes to these axis codes (e.g. ``RAS``); ``None`` keeps the source's.
        spacing: resample to this voxel spacing in mm; ``None`` keeps the native spacing.
        crop_foreground: crop to the body (non-background intensities) before training.
        slice_size: 2D/2.5D training slices are resized to ``[H, W]``; ``None`` keeps their size
            (then a batch needs slices of one size).
    """

    modality: Literal["ct", "mr", "image"] = "ct"
    window: tuple[float, float] = (-1000.0, 400.0)
    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    slice_size: tuple[int, int] | None = None

    @field_validator("window")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError("window must be [low, high] with low < high")
        return value

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("spacing values must be positive")
        return value


class InputConfig(StrictModel):
    """How volumes are fed to the network.

    Attributes:
        mode: ``2d`` (one slice), ``2.5d`` (``slab`` adjacent slices as channels) or ``3d`` (patches).
        slab: number of adjacent slices in 2.5D (odd); edge slices repeat the border slice.
        axis: slicing axis of the (reoriented) volume for 2D/2.5D, and in 3D the through-plane
            axis that augmentation and TCSM transformations leave alone; 2 is axial for RAS.
        patch_size: 3D training patch size.
        patches_per_volume: 3D patches drawn from each volume per visit.
        foreground_ratio: share of 3D patches/2D slices centred on foreground.
    """

    mode: Literal["2d", "2.5d", "3d"] = "2d"
    slab: int = Field(5, ge=1)
    axis: int = Field(2, ge=0, le=2)
    patch_size: tuple[int, int, int] = (64, 64, 16)
    patches_per_volume: int = Field(4, ge=1)
    foreground_ratio: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("slab")
    @classmethod
    def _slab(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("slab must be odd so that the centre slice is the one predicted")
        return value


class SegmentationModel(StrictModel):
    """Segmentation network, picked from MONAI.

    Attributes:
        name: ``basicunet`` (MONAI ``BasicUNet``) or ``unet`` (MONAI ``UNet`` with residual units).
        features: channels per level (BasicUNet: six numbers; UNet: one per level).
        dropout: dropout probability.
    """

    name: Literal["unet", "basicunet"] = "basicunet"
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class SegmentationLoss(StrictModel):
    """Supervised loss: continuous Dice, optionally plus cross-entropy and soft Dice.

    Attributes:
        include_background: count the background class in the Dice term.
        ce_weight: weight of the cross-entropy term (0 disables it). On by default: on a slice or
            patch without lesion a per-sample Dice term is about 1 whatever the prediction, so
            only the cross-entropy teaches the network to leave such samples empty.
        soft_dice_weight: weight of a soft-Dice term (``monai.losses.DiceLoss``) beside the
            continuous Dice (0 disables it); continuous Dice ignores confidence on the true
            region, soft Dice rewards it, which helps large faint lesions.
        batch: compute the Dice term over the whole batch per class (as
            ``monai.losses.DiceLoss(batch=True)``) instead of per sample; steadier for small,
            rare classes that many samples do not contain.
    """

    include_background: bool = False
    ce_weight: float = Field(1.0, ge=0.0)
    soft_dice_weight: float = Field(0.0, ge=0.0)
    batch: bool = False


class SegmentationAugment(StrictModel):
    """Training augmentation of labelled (and unlabelled) samples.

    Attributes:
        rotate90: random in-plane rotation by k·90 degrees.
        flip: random in-plane flips.
        intensity: small random intensity scale/shift.
        scale: random in-plane zoom, one magnification for both axes drawn from
            ``[1 - scale, 1 + scale]`` (with probability 0.5); 0 turns it off. 2D and 2.5D only.
        rotate_degrees: random in-plane rotation by up to this many degrees either way (with
            probability 0.5, drawn with the zoom); 0 turns it off. Unlike ``rotate90`` it keeps
            the slice size, so it also works on non-square slices. 2D and 2.5D only.
    """

    rotate90: bool = True
    flip: bool = True
    intensity: bool = False
    scale: float = Field(0.0, ge=0.0, lt=1.0)
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0)


class SegmentationTrain(StrictModel):
    """Optimisation (an iteration budget, so runs with different label counts compare).

    Attributes:
        max_epochs: epochs.
        iterations_per_epoch: iterations in one epoch; ``None`` is one pass over the labelled set.
        batch_size: labelled samples per iteration.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr: learning rate.
        weight_decay: L2 penalty.
        scheduler: ``cosine``, ``step`` or ``none``.
        amp: mixed precision on CUDA (ignored on CPU).
        cpu_amp: bfloat16 mixed precision when training on the CPU (ignored on CUDA). About
            1.7-2x as fast on CPUs with bfloat16 units (Intel AMX or AVX-512 BF16), slower on
            CPUs without them; results differ slightly from float32 training.
        val_every: validate every N epochs.
        checkpoint: crash-safe checkpointing.
    """

    max_epochs: int = Field(50, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    scheduler: SchedulerName = "cosine"
    amp: bool = True
    cpu_amp: bool = False
    val_every: int = Field(1, ge=1)
    checkpoint: CheckpointConfig = CheckpointConfig()


class TCSMConfig(StrictModel):
    """Transformation-consistent self-ensembling (mean teacher).

    Attributes:
        enabled: train with TCSM; off means plain supervised training.
        unlabeled_batch_size: unlabelled samples per iteration.
        demoted_share: share of the unlabelled samples drawn from the training cases whose
            labels ``labeled_count`` / ``labeled_fraction`` set aside, the rest from the cases
            that came unlabelled (the dataset's own and ``data.unlabeled_path``). ``None`` draws
            uniformly from the whole pool, so a small set-aside group is rarely seen beside a
            large unlabelled folder.
        ema_decay: teacher = decay·teacher + (1 − decay)·student after each step.
        ema_warmup_iterations: the decay ramps from 0 to ``ema_decay`` over these iterations, so
            the teacher follows the student closely at first.
        consistency_weight: maximum weight of the consistency loss.
        rampup_iterations: the weight ramps as exp(−5(1 − t)²), t = iteration / this.
        consistency_loss: ``mse`` between softmax maps, ``kl``, or ``ce``: cross-entropy
            against the teacher's most probable class where it is at least
            ``consistency_threshold`` sure (FixMatch's pseudo-labels); its scale is that of a
            supervised loss, so it wants a weight near 1, not the 10–100 of ``mse``.
        consistency_threshold: teacher confidence a pixel needs to count in the ``ce`` loss.
        rotate90: draw T from in-plane rotations by k·90 degrees.
        flip: and from flips.
        scale: maximum relative zoom of T (0 disables scaling).
        apply_to_labeled: also apply the consistency loss to labelled samples.
        validate_teacher: validate the teacher too and keep the better model.
        copy_paste_weight: maximum weight of the copy-paste term (0 disables it): a rectangle
            of each labelled image is pasted into an unlabelled one, or the reverse, and the
            student learns the mixed image against the true labels where the labelled image
            shows and the teacher's hard prediction elsewhere. It ramps up with the
            consistency weight. Needs unlabelled samples of the labelled ones' shape.
        copy_paste_size: side of the pasted rectangle relative to the image's height and width.
    """

    enabled: bool = False
    unlabeled_batch_size: int = Field(8, ge=1)
    demoted_share: float | None = Field(None, ge=0.0, le=1.0)
    ema_decay: float = Field(0.99, ge=0.0, le=1.0)
    ema_warmup_iterations: int = Field(0, ge=0)
    consistency_weight: float = Field(1.0, ge=0.0)
    rampup_iterations: int = Field(1000, ge=0)
    consistency_loss: Literal["mse", "kl", "ce"] = "mse"
    consistency_threshold: float = Field(0.95, ge=0.0, lt=1.0)
    rotate90: bool = True
    flip: bool = True
    scale: float = Field(0.0, ge=0.0, lt=1.0)
    apply_to_labeled: bool = True
    validate_teacher: bool = True
    copy_paste_weight: float = Field(0.0, ge=0.0)
    copy_paste_size: float = Field(0.667, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _copy_paste_without_zoom(self) -> TCSMConfig:
        # The pseudo-labels are the teacher's output on T(x) brought back by T⁻¹; undoing a
        # zoom-in leaves a zero border whose argmax would read as confident background.
        if self.copy_paste_weight > 0 and self.scale > 0:
            raise ValueError(
                "tcsm.copy_paste_weight needs tcsm.scale = 0 (a zoomed T cannot be undone exactly)"
            )
        return self


class SegmentationEval(StrictModel):
    """Evaluation and prediction options.

    Attributes:
        overlays: cases shown as overlays in the report (best, median, worst...).
        save_probabilities: also write per-class probability maps.
        sw_batch_size: sliding-window batch size (3D).
        sw_overlap: sliding-window overlap (3D).
        tta: average 2D/2.5D predictions over the eight in-plane rotations and flips (8× the
            prediction time; 3D sliding-window prediction ignores it).
        merge: extra classes scored as the union of label values, e.g. ``{infection: [1, 2]}``
            (reported beside the configured classes, left out of the foreground mean).
        min_component_size: predicted connected components of a foreground class smaller than
            this become background: mm³ for volumes, pixels for 2D images; 0 keeps them all.
        keep_largest: foreground classes of which only the largest connected component is
            kept (structures that are one piece, e.g. one nodule per crop).
    """

    overlays: int = Field(3, ge=0)
    save_probabilities: bool = False
    sw_batch_size: int = Field(4, ge=1)
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    tta: bool = False
    merge: dict[str, list[int]] = {}
    min_component_size: float = Field(0.0, ge=0.0)
    keep_largest: list[str] = []


class SegmentationExperiment(ExperimentModel):
    """A whole segmentation experiment."""

    task: Literal["segmentation"]
    run: RunConfig = RunConfig()
    data: SegmentationData
    preprocess: Preprocess = Preprocess()
    input: InputConfig = InputConfig()
    model: SegmentationModel = SegmentationModel()
    loss: SegmentationLoss = SegmentationLoss()
    augment: SegmentationAugment = SegmentationAugment()
    train: SegmentationTrain = SegmentationTrain()
    tcsm: TCSMConfig = TCSMConfig()
    eval: SegmentationEval = SegmentationEval()

    @model_validator(mode="after")
    def _slices_stack(self) -> SegmentationExperiment:
        # Cropping to the foreground gives every study its own in-plane size; slices can only
        # be batched when they are resized to one size.
        cropped = self.input.mode != "3d" and self.preprocess.crop_foreground
        if cropped and self.preprocess.slice_size is None and self.train.batch_size > 1:
            raise ValueError(
                "preprocess.slice_size must be set when preprocess.crop_foreground is on in 2D/2.5D mode "
                "(cropped slices differ in size and cannot be batched), or train.batch_size must be 1"
            )
        return self

    @model_validator(mode="after")
    def _zoom_needs_whole_slices(self) -> SegmentationExperiment:
        # A 3D patch is cut before augmentation: turning or zooming it out would fill its
        # corners with zeros, i.e. air inside the lungs, and label them background.
        if self.input.mode == "3d" and (self.augment.scale > 0 or self.augment.rotate_degrees > 0):
            raise ValueError(
                "augment.scale and augment.rotate_degrees act on whole slices (input.mode 2d or 2.5d); "
                "with 3d patches they would fill the patch corners with air; set them to 0"
            )
        return self
