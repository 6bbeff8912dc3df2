"""Config sections shared by every pipeline."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Unknown keys are errors, values are validated on assignment, and numbers are accepted where
# text is expected, because YAML reads unquoted names such as the grade folders 0 to 4 as
# integers.
_STRICT = ConfigDict(
    extra="forbid",
    validate_assignment=True,
    protected_namespaces=(),
    coerce_numbers_to_str=True,
    allow_inf_nan=False,
)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment.

    Numbers are accepted where text is expected, because YAML reads unquoted names such as the
    grade folders ``0`` to ``4`` as integers; booleans are refused where numbers are expected.
    """

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        return _null_sections_to_defaults(cls, data)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_yes_no_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse true/false where a number is expected, in a list too.

        YAML reads ``on``, ``yes`` and ``true`` as booleans, and pydantic would take them as 1:
        ``max_epochs: on`` trained for one epoch, ``lr: yes`` at a learning rate of 1.
        """
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(value, field.annotation):
            raise ValueError("takes numbers, not yes/no words (YAML reads on/off and yes/no as true/false)")
        return value


class ExperimentModel(BaseModel):
    """Base of a whole experiment: as strict as its sections.

    Its ``task`` key is the discriminator of the experiment union, on which pydantic allows no
    field validator; every other key is a section, which checks its own values.
    """

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        return _null_sections_to_defaults(cls, data)


def _null_sections_to_defaults(model: type[BaseModel], data: Any) -> Any:
    """A section whose keys are all commented out reads as null: it means the defaults."""
    if not isinstance(data, dict):
        return data
    sections = {
        name
        for name, field in model.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, StrictModel)
    }
    return {key: {} if value is None and key in sections else value for key, value in data.items()}


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """Whether ``value`` holds a boolean where ``annotation`` expects a number."""
    members = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(value, bool):
        return bool(members) and all(
            isinstance(a, type) and issubclass(a, (int, float)) and not issubclass(a, bool) for a in members
        )
    if isinstance(value, (list, tuple)):
        for member in members:
            if typing.get_origin(member) in (list, tuple):
                items = [a for a in typing.get_args(member) if a is not Ellipsis] or [Any]
                if len(items) == 1:
                    items = items * len(value)
                return any(_bool_for_number(v, a) for v, a in zip(value, items, strict=False))
    if isinstance(value, dict):
        for member in members:
            if typing.get_origin(member) is dict:
                _, item = typing.get_args(member)
                return any(_bool_for_number(v, item) for v in value.values())
    return False


class RunConfig(StrictModel):
    """Where a run writes and how it behaves.

    Attributes:
        output_dir: parent folder of run folders.
        name: run folder name; ``None`` derives ``<config stem>-<timestamp>``.
        seed: seed for splits, initialisation and augmentation.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (Apple GPUs).
        deterministic: ask torch for deterministic kernels (bitwise reproducible on CPU; on
            CUDA an operation without a deterministic kernel warns and runs anyway).
        num_threads: torch CPU threads; 0 keeps torch's default.
    """

    output_dir: str = "runs"
    name: str | None = None
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")
    deterministic: bool = False
    num_threads: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        # The name is joined to output_dir, and --overwrite deletes the result: ".." or "a/b"
        # would reach folders that are not this run's.
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            # The config error adds the value given, so the message does not repeat it.
            raise ValueError("run.name must be a single folder name: no slashes, and not '.' or '..'")
        return name


class CheckpointConfig(StrictModel):
    """Crash-safe checkpointing.

    Attributes:
        every_n_iterations: also checkpoint every N iterations (0: only at epoch ends).
        keep_last: how many resumable checkpoints to keep.
    """

    every_n_iterations: int = Field(0, ge=0)
    keep_last: int = Field(1, ge=1)


OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "cosine", "step"]


def check_distinct_classes(classes: list[str] | None) -> None:
    """Refuse a ``data.classes`` list that names a class twice.

    A repeated folder name would list its images under two labels, and a repeated segmentation
    class would give two report columns one name.

    Args:
        classes: the configured class names, or ``None``.

    Raises:
        ValueError: naming the repeated classes.
    """
    if classes is None:
        return
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise ValueError(f"classes names {', '.join(repr(n) for n in repeated)} more than once")


def check_folds(folds: int, fold: int) -> None:
    """Validate the ``data.folds`` / ``data.fold`` pair of a data section.

    Args:
        folds: number of cross-validation folds; 0 for none.
        fold: the validating fold.

    Raises:
        ValueError: for one fold, a fold without ``folds``, or a fold out of range.
    """
    if folds == 1:
        raise ValueError("folds=1 is no cross-validation: use 0 (a val_fraction split) or at least 2")
    if folds == 0 and fold:
        raise ValueError(f"fold={fold} needs folds (the number of cross-validation folds), e.g. folds=5")
    if folds and fold >= folds:
        raise ValueError(f"fold={fold} must be one of 0 to {folds - 1} with folds={folds}")
