"""Checkpoint files: written atomically, loaded without executing code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts. It is written
to a temporary file and renamed into place, and it is read with
``torch.load(weights_only=True)``, which refuses any pickled object that would run code
on load. Exported models use safetensors plus a JSON sidecar of metadata.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewlabel import __version__
from fewlabel.errors import CheckpointError
from fewlabel.utils.files import atomic_write, atomic_write_text
from fewlabel.utils.text import short_list

log = logging.getLogger(__name__)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a checkpoint dict.

    Args:
        payload: state dicts and metadata; only tensors and plain Python containers/scalars,
            so that it can be loaded with ``weights_only=True``.
        path: destination file.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda p: torch.save(payload, p))


def ensemble_paths(checkpoint: str | Path | Sequence[str | Path]) -> list[Path]:
    """The checkpoint files of one model, or of the models of an ensemble, each named once.

    Args:
        checkpoint: one checkpoint path, or several (``--checkpoint`` repeated).

    Returns:
        The paths, in the order given.

    Raises:
        ValueError: if no checkpoint is given.
        CheckpointError: if a file is given more than once (under any spelling of its path):
            averaging it twice would silently weigh that model double.
    """
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
    if not paths:
        raise ValueError("no checkpoint given")
    resolved = [p.resolve() for p in paths]
    repeated = sorted({str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1})
    if repeated:
        raise CheckpointError(f"{repeated[0]}: given more than once; each model of an ensemble counts once")
    return paths


def version_note(meta: dict[str, Any]) -> str:
    """Say which fewlabel wrote a checkpoint, when that may explain why it no longer loads.

    Checkpoints store their resolved config; a config key added, renamed or removed between
    releases makes an older or newer checkpoint's config invalid for this release, and the
    user then needs to know that the versions differ, not only which key is at fault.

    Args:
        meta: the checkpoint's ``meta`` dict.

    Returns:
        ``""`` when the checkpoint was written by this version of fewlabel, otherwise a
        sentence naming both versions (or saying that the writer recorded none).
    """
    written = meta.get("fewlabel_version")
    if written == __version__:
        return ""
    if written is None:
        return f" (the checkpoint does not record which fewlabel wrote it; this is fewlabel {__version__})"
    return f" (the checkpoint was written by fewlabel {written}; this is fewlabel {__version__})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely.

    Args:
        path: a file written by :func:`save_checkpoint` (or any ``weights_only``-safe torch file).
        map_location: where to put the tensors.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: if the file is missing, is not a torch file at all (e.g. a saved HTML
            page), is truncated or corrupt, or would execute code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch raises UnpicklingError both for a pickle naming a forbidden global (the one
        # case that would run code) and for bytes that are no pickle at all.
        details = _unpickling_details(err)
        if "GLOBAL" in details.upper() or _pickle_names_globals(path):
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects that could execute "
                f"code when loaded (only tensors and plain values are accepted). Re-export it from a "
                f"trusted source. Details: {details}"
            ) from err
        if not _has_torch_magic(path):
            raise CheckpointError(_not_a_checkpoint(path)) from err
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {details}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        if not _has_torch_magic(path):
            raise CheckpointError(_not_a_checkpoint(path)) from err
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    # A dict of the wrong shape would fail later, far from the file, with an AttributeError.
    for key in ("meta", "model"):
        if key in obj and not isinstance(obj[key], dict):
            raise CheckpointError(f"{path}: its {key!r} entry is a {type(obj[key]).__name__}, not a dict")
    bad = [k for k, v in obj.get("model", {}).items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: model weights {bad[:3]} are not tensors")
    return obj


def _unpickling_details(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what was refused."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL" in line.upper() or line.startswith("Unsupported"):
            return line
    return lines[0] if lines else type(err).__name__


def _has_torch_magic(path: Path) -> bool:
    """Whether a file starts like something ``torch.save`` writes: a zip archive or a pickle."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _pickle_names_globals(path: Path) -> bool:
    """Whether a plain pickle file imports or calls Python objects.

    torch's safe loader stops at the first opcode it does not know (e.g. the framing of
    pickle protocol 4), before it sees what the pickle would import; ``pickletools`` lists the
    opcodes without executing any, so such a pickle is still recognised as code.
    """
    import pickletools

    if not _has_torch_magic(path) or _is_zip(path):
        return False
    code_ops = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
    try:
        with open(path, "rb") as fh:
            return any(op.name in code_ops for op, _, _ in pickletools.genops(fh))
    except Exception:  # a damaged pickle: whatever was read before the damage held no code
        return False


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"PK"


def _not_a_checkpoint(path: Path) -> str:
    if path.stat().st_size == 0:
        what = "it is an empty file (0 bytes)"
    else:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip().lower()
        what = "it is not a valid torch zip or pickle file"
        if head.startswith(b"<"):
            what += "; it looks like an HTML/XML page (a failed download?)"
    return f"{path}: not a checkpoint (expected a file written by torch.save / fewlabel): {what}"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load bare model weights from ``.safetensors`` or a ``weights_only``-safe torch file.

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Args:
        path: the weights file.

    Returns:
        A state dict of tensors.

    Raises:
        CheckpointError: if the file is missing, unsafe, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    obj = load_checkpoint(path)
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return obj


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """The weights and metadata files an export to ``path`` writes.

    ``.safetensors`` is appended unless ``path`` already ends in it, so dotted names such as
    ``grading-v1.2`` keep every character.

    Args:
        path: destination, with or without the ``.safetensors`` suffix.

    Returns:
        ``(<stem>.safetensors, <stem>.json)``.
    """
    path = Path(path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(stem + ".safetensors"), path.with_name(stem + ".json")


def export_safetensors(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], path: str | Path
) -> Path:
    """Export weights for sharing: ``<path>.safetensors`` plus ``<path>.json`` metadata.

    Args:
        state_dict: model weights.
        metadata: JSON-serialisable description (class names, input size, normalisation, config).
        path: destination, with or without the ``.safetensors`` suffix (see :func:`export_paths`).

    Returns:
        The path of the safetensors file.
    """
    from safetensors.torch import save_file

    weights, sidecar = export_paths(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    atomic_write_text(sidecar, json.dumps(metadata, indent=2, default=str))
    return weights


#: Settings a run may be resumed with after they changed: where and how fast it runs, not what
#: it learns.
RESUMABLE_CHANGES = (
    "run.device",
    "run.num_threads",
    "run.output_dir",
    "run.name",
    "data.num_workers",
    "data.cache",
)


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two dumped configs.

    Keys that only one side has are left out: a run saved by an older fewlabel lacks the keys
    added since, which take their defaults.

    Args:
        saved: ``model_dump(mode="json")`` of the config a checkpoint was trained with.
        current: the same dump of the config about to be used.
        prefix: dotted path of these mappings (for recursion).

    Returns:
        The differing keys, in the order of ``saved``.
    """
    changed = []
    for key, old in saved.items():
        if key not in current:
            continue
        new, name = current[key], f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changed += config_changes(old, new, f"{name}.")
        elif old != new:
            changed.append(name)
    return changed


def _added_keys_off_default(
    saved: dict[str, Any], current: dict[str, Any], model: Any, prefix: str = ""
) -> list[str]:
    """Keys a run's saved config lacks (added to fewlabel since) that are now set off their default.

    The run was trained with the default of such a key; giving it another value in
    ``config.yaml`` before resuming is as much a change as editing a key the run recorded.

    Args:
        saved: the dumped config the checkpoint was trained with.
        current: the dumped config about to be used.
        model: the validated config (or section) that ``current`` dumps, for the defaults.
        prefix: dotted path of these mappings (for recursion).

    Returns:
        The dotted keys.
    """
    changed = []
    fields = getattr(type(model), "model_fields", {})
    for key, new in current.items():
        name, value = f"{prefix}{key}", getattr(model, key, None)
        if key not in saved:
            field = fields.get(key)
            if field is not None and not field.is_required():
                default = field.get_default(call_default_factory=True)
                default = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
                if default != new:
                    changed.append(name)
        elif isinstance(saved[key], dict) and isinstance(new, dict) and hasattr(value, "model_fields"):
            changed += _added_keys_off_default(saved[key], new, value, f"{name}.")
    return changed


def check_resume_config(cfg: Any, checkpoint: Path, config_file: Path) -> None:
    """Refuse to resume a run whose ``config.yaml`` no longer says what it was trained with.

    ``--resume`` reads the run folder's ``config.yaml``; an edit there (another seed, more
    epochs, another learning rate) would continue the run under settings it did not start
    with: a seed changes the split, so the test set would hold training cases. Only
    :data:`RESUMABLE_CHANGES` may differ, and ``train.max_epochs``, to train on for longer
    (with a warning when a learning-rate schedule spans the run: it is stretched mid-way).

    Args:
        cfg: the config loaded from ``config_file``.
        checkpoint: the run's ``last.pt`` (nothing is checked when it does not exist, or holds
            no config).
        config_file: the run's ``config.yaml``, for the message.

    Raises:
        CheckpointError: naming the keys that changed.
    """
    if not checkpoint.is_file():
        return
    saved = load_checkpoint(checkpoint).get("meta", {}).get("config")
    if not isinstance(saved, dict):
        return
    current = cfg.model_dump(mode="json")
    changed = config_changes(saved, current) + _added_keys_off_default(saved, current, cfg)
    changed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if "train.max_epochs" in changed:
        changed.remove("train.max_epochs")
        old, new = saved["train"]["max_epochs"], cfg.train.max_epochs
        if cfg.train.scheduler != "none":
            log.warning(
                "%s: train.max_epochs changed from %s to %s: the %s learning-rate schedule now spans "
                "the new length from where the run stopped, unlike a run started with %s epochs",
                config_file,
                old,
                new,
                cfg.train.scheduler,
                new,
            )
    if changed:
        raise CheckpointError(
            f"{config_file}: differs from the config {checkpoint} was trained with ({short_list(changed)}); a resumed "
            "run must continue as it started. Restore those values, or train a new run with them"
        )
