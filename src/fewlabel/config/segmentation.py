"""Schema of a segmentation experiment (supervised or TCSM semi-supervised)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fewlabel.config.common import CheckpointConfig, OptimizerName, RunConfig, SchedulerName, StrictModel


class SegmentationData(StrictModel):
    """Where the studies are.

    Attributes:
        format: ``msd`` (``dataset.json`` + ``imagesTr/labelsTr/imagesTs``), ``csv``
            (``image,label,patient_id``), ``slices2d`` (``images/`` + ``masks/`` folders of 2D
            images), or ``auto``.
        path: dataset folder or CSV file.
        classes: class names, index = label value (``0`` is background).
    """

    format: Literal["auto", "msd", "csv", "slices2d"] = "auto"
    path: str
    classes: list[str] = ["background", "lesion"]
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    num_workers: int = Field(0, ge=0)


class SegmentationModel(StrictModel):
    """Segmentation network (picked from MONAI)."""

    name: Literal["unet", "basicunet"] = "basicunet"
    features: list[int] = [32, 32, 64, 128, 256, 32]


class SegmentationTrain(StrictModel):
    """Optimisation."""

    max_epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    scheduler: SchedulerName = "cosine"
    amp: bool = True
    val_every: int = Field(1, ge=1)
    checkpoint: CheckpointConfig = CheckpointConfig()


class SegmentationExperiment(StrictModel):
    """A whole segmentation experiment."""

    task: Literal["segmentation"]
    run: RunConfig = RunConfig()
    data: SegmentationData
    model: SegmentationModel = SegmentationModel()
    train: SegmentationTrain = SegmentationTrain()
