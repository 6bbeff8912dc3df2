"""Exceptions raised for problems a user can fix.

Every error that reaches the command line derives from :class:`FewLabelError`; the CLI
prints its message (which names the offending file or key) and exits non-zero, without
a traceback. Anything else is a bug in fewlabel and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class FewLabelError(Exception):
    """Base class for user-facing errors."""


class ConfigError(FewLabelError):
    """The configuration is invalid (unknown key, wrong type, out-of-range value)."""


class DataError(FewLabelError):
    """An input file or folder is missing, unreadable or inconsistent.

    Args:
        path: the offending file or folder (named in the message).
        problem: what is wrong with it. When omitted, ``path`` is taken as the whole message:
            PyTorch's data-loader workers re-raise exceptions as ``type(message)``, and the
            error must survive that trip with its text intact.
    """

    def __init__(self, path: str | Path | None, problem: str | None = None) -> None:
        if problem is None:
            self.path, self.problem = None, str(path)
            super().__init__(str(path))
            return
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class CheckpointError(FewLabelError):
    """A checkpoint cannot be loaded safely or does not match the model."""


class RunDirError(FewLabelError):
    """A run folder exists already, or cannot be resumed."""
