"""Config sections shared by every pipeline."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment.

    Numbers are accepted where text is expected, because YAML reads unquoted names such as the
    grade folders ``0`` to ``4`` as integers.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_yes_no_numbers(cls, data: Any) -> Any:
        """Refuse true/false where a number is expected.

        YAML reads ``on``, ``yes`` and ``true`` as booleans, and pydantic would take them as 1:
        ``max_epochs: on`` trained for one epoch, ``lr: yes`` at a learning rate of 1. (A model
        validator, not a field one: pydantic forbids the latter on the ``task`` discriminator.)
        """
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool) and _is_number(field.annotation):
                    raise PydanticCustomError(
                        "yes_no_number",
                        "takes a number, not {value} (YAML reads on/off and yes/no as true/false)",
                        {"key": name, "value": str(value).lower()},
                    )
        return data


def _is_number(annotation: Any) -> bool:
    """Whether a field holds a number (``int``, ``float``, optionally ``| None``), not a bool."""
    members = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool(members) and all(
        isinstance(a, type) and issubclass(a, (int, float)) and not issubclass(a, bool) for a in members
    )


class RunConfig(StrictModel):
    """Where a run writes and how it behaves.

    Attributes:
        output_dir: parent folder of run folders.
        name: run folder name; ``None`` derives ``<config stem>-<timestamp>``.
        seed: seed for splits, initialisation and augmentation.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        deterministic: force deterministic kernels (bitwise reproducible on CPU).
        num_threads: torch CPU threads; 0 keeps torch's default.
    """

    output_dir: str = "runs"
    name: str | None = None
    seed: int = Field(0, ge=0)
    device: str = "auto"
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
