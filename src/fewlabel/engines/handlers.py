"""Handlers shared by the training engines: training history and resumable checkpoints.

Ignite's ``Checkpoint`` handler deletes the previous file before writing the next one when
the file name is fixed (``last.pt``), which leaves a moment with no resumable checkpoint at
all; :class:`ResumableCheckpointer` instead replaces ``last.pt`` atomically and keeps older
states under numbered names. :class:`TrainingHistory` keeps one row per epoch and rewrites
``history.csv`` and ``learning_curves.png`` after each, so a crashed run still shows how far
it got.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewlabel.engines.checkpoint import save_checkpoint
from fewlabel.utils.files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "HISTORY_CSV",
    "LAST_CHECKPOINT",
    "LEARNING_CURVES_PNG",
    "ResumableCheckpointer",
    "TrainingHistory",
]

HISTORY_CSV = "history.csv"
LEARNING_CURVES_PNG = "learning_curves.png"
LAST_CHECKPOINT = "last.pt"
_NUMBERED = re.compile(r"^last-(\d+)\.pt$")


class TrainingHistory:
    """Per-epoch rows written to ``history.csv`` and plotted to ``learning_curves.png``.

    Args:
        folder: where the two files go (the run folder).
        x: the column on the plots' horizontal axis.
    """

    def __init__(self, folder: str | Path, x: str = "epoch") -> None:
        self.folder = Path(folder)
        self.x = x
        self.rows: list[dict[str, Any]] = []

    @property
    def csv_path(self) -> Path:
        """Path of ``history.csv``."""
        return self.folder / HISTORY_CSV

    @property
    def png_path(self) -> Path:
        """Path of ``learning_curves.png``."""
        return self.folder / LEARNING_CURVES_PNG

    def load(self, upto: int) -> None:
        """Read an existing ``history.csv``, keeping rows with ``x <= upto`` (for resuming).

        Rows beyond ``upto`` were written after the checkpoint being resumed from and will be
        recomputed.

        Args:
            upto: last value of the ``x`` column to keep.
        """
        self.rows = []
        if not self.csv_path.is_file():
            return
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                parsed = {k: _parse(v) for k, v in row.items()}
                x = parsed.get(self.x)
                if isinstance(x, (int, float)) and x <= upto:
                    self.rows.append(parsed)

    def append(self, row: Mapping[str, Any], plot: bool = True) -> None:
        """Add a row and rewrite the files.

        Args:
            row: column name to value (``None`` for missing values).
            plot: also redraw the learning curves.
        """
        self.rows.append(dict(row))
        self.write(plot=plot)

    def write(self, plot: bool = True) -> None:
        """Rewrite ``history.csv`` (and ``learning_curves.png``) atomically.

        Args:
            plot: also redraw the learning curves.
        """
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _format(v) for k, v in row.items()})
        atomic_write_text(self.csv_path, buf.getvalue())
        if plot and self.rows:
            from fewlabel.reports.plots import plot_learning_curves

            numeric = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in self.rows]
            plot_learning_curves(numeric, self.png_path, x=self.x)


class ResumableCheckpointer:
    """Write the resumable checkpoint ``last.pt`` atomically, keeping ``keep_last`` states.

    With ``keep_last == 1`` only ``last.pt`` exists. With more, each state is written as
    ``last-<iteration>.pt`` and ``last.pt`` is atomically re-pointed to it (a hard link, or a
    copy where links are unsupported); the oldest numbered files beyond ``keep_last`` are
    deleted afterwards, so a crash at any moment leaves at least one complete checkpoint.

    Args:
        folder: the checkpoint folder.
        keep_last: how many resumable states to keep (>= 1).
    """

    def __init__(self, folder: str | Path, keep_last: int = 1) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.folder = Path(folder)
        self.keep_last = keep_last

    @property
    def path(self) -> Path:
        """Path of ``last.pt``."""
        return self.folder / LAST_CHECKPOINT

    def save(self, payload: dict[str, Any], iteration: int) -> Path:
        """Save a resumable state.

        Args:
            payload: the checkpoint dict (``weights_only``-loadable).
            iteration: global iteration counter, used to name kept states.

        Returns:
            The path of ``last.pt``.
        """
        if self.keep_last == 1:
            return save_checkpoint(payload, self.path)
        numbered = save_checkpoint(payload, self.folder / f"last-{iteration:09d}.pt")
        tmp = self.folder / f".{LAST_CHECKPOINT}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(numbered, tmp)
        except OSError:
            shutil.copyfile(numbered, tmp)
            with open(tmp, "rb") as copy:
                os.fsync(copy.fileno())  # on disk before the rename makes it last.pt
        os.replace(tmp, self.path)
        # By iteration, not by name; states after this one are left from a run that was
        # restarted from earlier and are no longer part of this run's history.
        states = {int(m.group(1)): p for p in self.folder.iterdir() if (m := _NUMBERED.match(p.name))}
        keep = sorted(i for i in states if i <= iteration)[-self.keep_last :]
        for i, old in states.items():
            if i not in keep:
                old.unlink(missing_ok=True)
        return self.path


def _format(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def _parse(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
