"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through a temporary sibling, then rename it into place.

    The rename is atomic on POSIX file systems, so a crash leaves either the old file or the
    new one, never a truncated mix.

    Args:
        path: final destination.
        write: callable that writes the content to the temporary path it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600 files (and some writers recreate the file): results are shared
        # with colleagues, so honour the umask instead.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text.

    Args:
        path: destination.
        text: content.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
