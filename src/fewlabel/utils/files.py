"""Atomic file writes (a reader never sees a half-written file) and safe folder replacement."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from fewlabel.errors import RunDirError

#: Files that mark a folder as a fewlabel report or prediction folder.
OUTPUT_MARKERS = ("report.html", "summary.json", "metrics.json", "predictions.csv")


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
        _chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry list: without this a power cut right after it can
    # bring back the old file (or none) although the new one was complete.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - folders that cannot be opened (some network mounts)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that do not sync folders
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text.

    Args:
        path: destination.
        text: content.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def lies_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, links and ``..`` resolved.

    Args:
        path: an output about to be written.
        folder: a folder that is read.

    Returns:
        True when writing ``path`` would write into ``folder``.
    """
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_replaceable(
    folder: str | Path, inputs: Sequence[str | Path] = (), markers: Sequence[str] = OUTPUT_MARKERS
) -> None:
    """Refuse to delete ``folder`` for ``--overwrite`` unless that loses nothing but old outputs.

    ``--overwrite`` removes the old folder before the new one takes its place, so a mistyped
    output path that names a data folder, a folder holding the inputs, or any folder fewlabel
    did not write must be refused rather than deleted.

    Args:
        folder: the folder about to be replaced (nothing is checked when it does not exist).
        inputs: files and folders the command reads; none may lie in ``folder``.
        markers: names of which at least one must exist in a non-empty ``folder``.

    Raises:
        RunDirError: if ``folder`` is a symbolic link, not a folder, the current folder or one
            above it, holds one of ``inputs``, or is neither empty nor marked as a fewlabel
            output (holds one of ``markers``).
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise RunDirError(
            f"{folder}: is a symbolic link; outputs do not replace links, choose another output"
        )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder; it cannot be replaced by an output folder")
    resolved = folder.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise RunDirError(
            f"{folder}: is the current folder or a folder above it; replacing it would delete what you "
            "are working in, choose another output"
        )
    for item in inputs:
        item_resolved = Path(item).resolve()
        if item_resolved == resolved or resolved in item_resolved.parents:
            raise RunDirError(
                f"{folder}: holds the input {item}; replacing it would delete the input, choose another output"
            )
    if any(folder.iterdir()) and not any((folder / marker).exists() for marker in markers):
        raise RunDirError(
            f"{folder}: exists and does not look like a fewlabel output folder (none of "
            f"{', '.join(markers)}); refusing to delete it, choose another output"
        )


@contextmanager
def staged_folder(output: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling of ``output`` to fill; swap it in for ``output`` once complete.

    A command that fails half-way (a bad case, out of memory, Ctrl-C) then leaves the previous
    ``output`` as it was, or none, never a half-written folder that looks like a finished one.
    The caller decides beforehand whether ``output`` may be replaced (:func:`check_replaceable`).

    Args:
        output: the folder to create or replace.

    Yields:
        The temporary folder, on the same file system, with the permissions the umask gives
        (and the parent's setgid bit, so that a shared project folder's group carries over).

    Raises:
        RunDirError: before anything is done, if ``output`` is a symbolic link (a link is not
            replaced, and writing through it would bypass the checks made on ``output``).
    """
    import stat

    output = Path(output)
    if output.is_symlink():
        raise RunDirError(
            f"{output}: is a symbolic link; outputs do not replace links, choose another output"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        # mkdtemp makes it private; this is an ordinary output folder
        _chmod(tmp, (0o777 & ~_umask()) | (output.parent.stat().st_mode & stat.S_ISGID))
        yield tmp
        if output.is_dir():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chmod(path: Path, mode: int) -> None:
    # File systems without POSIX permissions (vfat and exFAT USB disks, some SMB shares) refuse
    # chmod; their files are readable anyway, and the write must not fail for it.
    with suppress(PermissionError):
        os.chmod(path, mode)


def _umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it; between the two calls another thread (a data
    loader, a logging handler) would create its files world-writable. Linux reports it in
    ``/proc/self/status``; elsewhere the set-and-restore is the only way.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
