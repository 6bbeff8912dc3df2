"""Run folders: one folder holds everything a run made.

A run folder carries ``status.json`` whose ``state`` is ``running``, ``failed`` (with the
error) or ``completed``. Only a completed run looks complete; a crashed or killed run stays
``running`` (or ``failed``) and can be resumed with ``fewlabel train --resume RUN_DIR``.
``environment.json`` lists each session of the run (the start and every resume) with the
software versions it ran under.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fewlabel.errors import FewLabelError, RunDirError
from fewlabel.utils.files import atomic_write_text, check_replaceable

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"


@dataclass
class RunDir:
    """A run folder and its conventional sub-paths."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def status_file(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def environment_file(self) -> Path:
        return self.path / ENVIRONMENT_FILE

    def record_session(self, software: dict[str, str], started: str) -> None:
        """Append a session (a start or a resume) and its software versions to ``environment.json``.

        A resume under other versions than the run's first session is logged as a warning:
        the run is then no longer reproducible bit for bit.

        Args:
            software: see :func:`fewlabel.utils.environment.software_versions`.
            started: ISO time of the session's start.
        """
        sessions: list[dict] = []
        if self.environment_file.is_file():
            try:
                sessions = list(json.loads(self.environment_file.read_text(encoding="utf-8"))["sessions"])
            except (OSError, ValueError, KeyError, TypeError):
                # The file records, it does not steer: a damaged one must not stop the run.
                log.warning("%s is unreadable; it is started again", self.environment_file)
        if sessions:
            first = sessions[0].get("software", {})
            changed = sorted(
                k for k in set(first) | set(software) if k != "gpus" and first.get(k) != software.get(k)
            )
            if changed:
                log.warning(
                    "resuming %s under other software than it started with (%s): the results may "
                    "differ from an uninterrupted run",
                    self.path,
                    ", ".join(
                        f"{k} {first.get(k, 'absent')} -> {software.get(k, 'absent')}" for k in changed
                    ),
                )
        sessions.append({"started": started, "software": software})
        atomic_write_text(self.environment_file, json.dumps({"sessions": sessions}, indent=2))

    def read_status(self) -> dict:
        """Return the parsed ``status.json`` (empty dict when absent)."""
        if not self.status_file.is_file():
            return {}
        return json.loads(self.status_file.read_text(encoding="utf-8"))

    def write_status(self, state: str, **extra) -> None:
        """Atomically record the run's state.

        Args:
            state: ``created`` (training not started), ``running``, ``failed`` or ``completed``.
            **extra: more JSON-serialisable fields (error message, report path...).
        """
        status = self.read_status()
        if state != "failed":
            # A resumed run that goes on is no longer failed: its old error must not linger.
            status.pop("error", None)
            status.pop("traceback", None)
        status.update(extra)
        status["state"] = state
        status["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.status_file, json.dumps(status, indent=2))


def create_run_dir(
    output_dir: str | Path,
    name: str | None,
    stem: str = "run",
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> RunDir:
    """Create a fresh run folder.

    Args:
        output_dir: parent folder.
        name: folder name; ``None`` makes ``<stem>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``...
            appended when runs start in the same second (a generated name never replaces a
            folder, whatever ``overwrite`` says).
        stem: prefix of generated names.
        overwrite: allow reusing an existing run folder (its old files are removed). A run
            folder that failed before training started (it holds only its config and a
            ``failed`` status) is replaced without it.
        inputs: files and folders the run reads (config, data, weights); a folder holding
            one of them is never removed.

    Returns:
        The new run folder.

    Raises:
        RunDirError: if the folder exists and ``overwrite`` is false, or it is not a run folder
            or holds one of ``inputs``.
    """
    output_dir = Path(output_dir)
    if name is None:
        return _fresh_run_dir(output_dir, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = output_dir / name
    if path.exists():
        if not overwrite and _failed_before_training(path):
            # Nothing was made but the config and the error: rerunning the corrected command
            # should not need --overwrite (nor --resume, which would repeat the saved config).
            log.info("replacing %s: it failed before training started and holds nothing else", path)
            overwrite = True
        if not overwrite:
            raise RunDirError(
                f"{path}: run folder exists already; choose another run.name, resume it with "
                f"--resume {path}, or pass --overwrite to replace it"
            )
        import shutil

        # status.json, not config.yaml: that name is common in folders fewlabel did not write.
        check_replaceable(path, inputs, markers=(STATUS_FILE,))
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return _claimed(RunDir(path))


def _fresh_run_dir(output_dir: Path, name: str) -> RunDir:
    """A new folder ``name``, or ``name-2``, ``name-3``...: claimed by an exclusive mkdir.

    Runs of a sweep started in the same second would otherwise share (or, with --overwrite,
    delete) one folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = output_dir / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return _claimed(RunDir(path))
    raise RunDirError(f"{output_dir}: 999 runs named {name}-N exist already; set run.name")


def _claimed(run: RunDir) -> RunDir:
    # Marked at once: interrupted before its training starts, the folder is recognised as a
    # run that never began, and the rerun replaces it without --overwrite.
    run.write_status(CREATED)
    return run


#: State of a run folder whose training has not started yet.
CREATED = "created"


def _failed_before_training(path: Path) -> bool:
    """Whether ``path`` is a run folder that never started training.

    It holds only its config, status and environment, and its state is ``failed`` or
    ``created`` (the process was stopped between the two).
    """
    if not path.is_dir() or {p.name for p in path.iterdir()} - {ENVIRONMENT_FILE, CONFIG_FILE} != {
        STATUS_FILE
    }:
        return False
    try:
        return RunDir(path).read_status().get("state") in ("failed", CREATED)
    except (OSError, ValueError):
        return False


def open_run_dir(path: str | Path) -> RunDir:
    """Open an existing run folder for resuming.

    Args:
        path: the run folder.

    Returns:
        The run folder.

    Raises:
        RunDirError: if it is missing or has no resolved config.
    """
    run = RunDir(Path(path))
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: run folder not found")
    if not run.config_file.is_file():
        raise RunDirError(f"{run.path}: not a fewlabel run folder (no {CONFIG_FILE})")
    return run


@contextmanager
def track_run(run: RunDir):
    """Mark a run ``running`` while the body executes, then ``completed`` or ``failed``.

    Args:
        run: the run folder.

    Yields:
        The run folder.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.write_status("running", started=started)
    previous = _on_sigterm_raise()
    try:
        # Deferred, and inside the try: it imports torch and MONAI (seconds), which commands
        # that only read run folders never need, and a Ctrl-C meanwhile is a failed run too.
        from fewlabel.utils.environment import software_versions

        run.record_session(software_versions(), started)
        yield run
    except RunTerminated:
        run.write_status(
            "failed",
            error="terminated (SIGTERM: a batch scheduler's time limit, or a stop); continue with --resume",
        )
        raise
    except KeyboardInterrupt:
        run.write_status("failed", error="interrupted by the user")
        raise
    except FewLabelError as err:
        run.write_status("failed", error=str(err))
        raise
    except Exception as err:
        run.write_status("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    run.write_status("completed")


class RunTerminated(KeyboardInterrupt):
    """SIGTERM during a run: unwinds like Ctrl-C (handlers and checkpoints close as for it)."""


def _on_sigterm_raise() -> Any:
    """Make SIGTERM raise :class:`RunTerminated`; returns the previous handler (None off the main thread).

    Batch schedulers (SLURM at its time limit), ``docker stop`` and ``kill`` send SIGTERM; by
    default the process would die with ``status.json`` still saying ``running``.
    """

    def terminate(signum: int, frame: Any) -> None:
        raise RunTerminated()

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # signal handlers can be set only from the main thread
        return None
