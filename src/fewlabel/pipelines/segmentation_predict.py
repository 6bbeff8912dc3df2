"""Using a trained segmentation network: loading it, predicting studies on their own grid.

- :func:`load_segmentation_model` rebuilds the network and its config from a checkpoint;
  :func:`load_segmentation_models` several of them, joined into a :class:`ModelEnsemble`.
- :func:`predict_study` predicts one study (NIfTI file, DICOM series folder or 2D image) and
  maps the class probabilities back onto the source's voxel grid by inverting the
  preprocessing with MONAI's ``Invertd`` (reorientation, resampling and foreground crop
  undone, probabilities interpolated bilinearly, the mask their arg-max), so a reopened mask
  overlays its source voxel for voxel.
- :func:`predict` is ``fewlabel predict``: a mask (and optionally the probabilities) for every
  study given, and ``predictions.csv`` with the size of each predicted class.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewlabel.config.segmentation import SegmentationExperiment
from fewlabel.data.readers import study_name as case_name
from fewlabel.engines.checkpoint import ensemble_paths, version_note
from fewlabel.errors import CheckpointError, ConfigError, DataError, FewLabelError
from fewlabel.inference.postprocessing import check_keep_largest, postprocess_labels
from fewlabel.utils.csv_cells import csv_text, escape_cell, unescape_cell
from fewlabel.utils.files import atomic_write, atomic_write_text, lies_within
from fewlabel.utils.runtime import config_device, torch_threads
from fewlabel.utils.text import short_list

log = logging.getLogger(__name__)

# --set keys that a trained model accepts: how to evaluate, and where and how fast to run.
_INFERENCE_KEYS = ("eval.", "run.device=", "run.num_threads=")

__all__ = [
    "LoadedModel",
    "ModelEnsemble",
    "case_name",
    "collect_studies",
    "load_segmentation_model",
    "load_segmentation_models",
    "mask_suffix",
    "predict",
    "predict_study",
    "refuse_inside_inputs",
]


class LoadedModel:
    """A trained network with everything needed to preprocess, predict and invert.

    Attributes:
        net: the network (eval mode, on ``device``).
        cfg: the experiment config it was trained with.
        meta: the checkpoint metadata.
        classes: class names, index = label value.
        spatial_dims: 3 (volumes) or 2 (2D images).
        device: where it runs.
        path: the checkpoint file.
    """

    def __init__(
        self,
        net: nn.Module,
        cfg: SegmentationExperiment,
        meta: dict[str, Any],
        device: torch.device,
        path: Path,
    ) -> None:
        self.net = net
        self.cfg = cfg
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.spatial_dims = int(meta["spatial_dims"])
        self.device = device
        self.path = path
        self._preprocessing: Any = None

    @property
    def preprocessing(self) -> Any:
        """The preprocessing ``Compose`` of the config, built on first use and then reused."""
        if self._preprocessing is None:
            from fewlabel.data.segmentation_transforms import build_preprocessing

            self._preprocessing = build_preprocessing(
                self.cfg.preprocess, with_label=False, spatial_dims=self.spatial_dims
            )
        return self._preprocessing

    @property
    def members(self) -> list[LoadedModel]:
        """The networks whose probabilities are averaged: this one alone."""
        return [self]

    def describe(self) -> str:
        """The network, which of a run's models it is and its test-time augmentation, for reports."""
        tta = (
            ", mean of 8 in-plane turns and flips"
            if self.cfg.eval.tta and self.cfg.input.mode != "3d"
            else ""
        )
        return f"{self.cfg.model.name} {list(self.cfg.model.features)} ({self.meta.get('model_name', 'student')}{tta})"


class ModelEnsemble:
    """Several trained segmentation networks whose class probabilities are averaged.

    Each member predicts a study its own way (its own preprocessing, sliding window and
    test-time augmentation) and its probabilities are mapped back onto the study's grid before
    they are averaged, so networks trained at other resolutions or input modes can be joined,
    e.g. the runs of several seeds or folds. Everything else (the data and test split it is
    evaluated on, the ``eval`` settings of the outputs, the threads) is the first member's:
    the ensemble is used like that model.

    MONAI's ``MeanEnsemble`` stacks every member's output before averaging, which for a whole
    CT study is one float32 volume per class and member; :func:`predict_study` keeps a running
    sum instead, so memory does not grow with the number of members.

    Args:
        members: the loaded models, at least one.

    Raises:
        CheckpointError: if the members predict different classes or kinds of studies.
    """

    def __init__(self, members: Sequence[LoadedModel]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one model")
        first = members[0]
        kinds = {2: "2D images", 3: "3D volumes"}
        for other in members[1:]:
            if other.classes != first.classes:
                raise CheckpointError(
                    f"{other.path}: predicts the classes {other.classes}, {first.path} {first.classes}; "
                    "models averaged together must predict the same classes in the same order"
                )
            if other.spatial_dims != first.spatial_dims:
                raise CheckpointError(
                    f"{other.path}: was trained on {kinds[other.spatial_dims]}, {first.path} on "
                    f"{kinds[first.spatial_dims]}; models averaged together must take the same studies"
                )
        self.members = list(members)
        self.cfg = first.cfg
        self.meta = first.meta
        self.classes = first.classes
        self.spatial_dims = first.spatial_dims
        self.device = first.device
        self.path = first.path

    def describe(self) -> str:
        """How many networks are averaged and which, for reports."""
        if len(self.members) == 1:
            return self.members[0].describe()
        kinds = sorted({m.describe() for m in self.members})
        return f"mean of {len(self.members)} models: {'; '.join(kinds)}"


def load_segmentation_model(
    checkpoint: str | Path, device: torch.device | str | None = None, eval_overrides: list[str] | None = None
) -> LoadedModel:
    """Rebuild a network from a checkpoint written by segmentation training.

    Args:
        checkpoint: ``best.pt`` (or ``last.pt``) of a segmentation run.
        device: where to run; default the config's ``run.device`` (``--set run.device=...``
            changes it), or the best device here when the machine lacks the one trained on.
        eval_overrides: ``eval.KEY=VALUE`` changes to the stored config's evaluation section
            (e.g. ``eval.tta=true``), and ``run.device`` / ``run.num_threads``, which say where
            to run; other sections describe how the model was trained and stay.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        CheckpointError: if the file is not a segmentation checkpoint or does not fit its config.
    """
    from fewlabel.config import parse_config
    from fewlabel.engines.checkpoint import load_checkpoint
    from fewlabel.networks.segmentation import build_segmentation_net

    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    if meta.get("task") != "segmentation":
        raise CheckpointError(f"{path}: not a segmentation checkpoint (task {meta.get('task')!r})")
    for key in ("classes", "spatial_dims", "in_channels", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: holds no model weights")
    stored = meta["config"]
    if eval_overrides:
        from fewlabel.config import apply_overrides

        outside = [o for o in eval_overrides if not o.startswith(_INFERENCE_KEYS)]
        if outside:
            raise ConfigError(
                f"--set {outside[0]!r}: only eval.*, run.device and run.num_threads can change after training"
            )
        stored = apply_overrides(stored, eval_overrides)
    try:
        cfg = parse_config(stored, source=f"{path} (stored config{version_note(meta)})")
    except ConfigError as err:
        if eval_overrides:
            raise
        raise CheckpointError(str(err)) from err
    check_keep_largest(cfg.eval.keep_largest, list(meta["classes"]))
    if cfg.eval.tta and cfg.input.mode == "3d":
        log.warning(
            "%s: eval.tta averages in-plane turns of 2D/2.5D slices; this 3D model predicts without it", path
        )
    if device is not None:
        device = torch.device(device)
    elif any(o.startswith("run.device=") for o in eval_overrides or []):
        device = config_device(cfg.run.device)
    else:
        device = _trained_device_or_best(cfg.run.device, path)
    net = build_segmentation_net(
        cfg.model, 3 if cfg.input.mode == "3d" else 2, int(meta["in_channels"]), len(meta["classes"])
    )
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the stored model config: {err}") from err
    net.to(device).eval()
    return LoadedModel(net, cfg, meta, device, path)


def _trained_device_or_best(name: str, checkpoint: Path) -> torch.device:
    """The ``run.device`` a model was trained with, or the best one here if this machine lacks it.

    A model trained on a GPU server is routinely evaluated on a laptop; only a device the user
    asks for (``--set run.device=...``) is refused when missing.
    """
    from fewlabel.utils.runtime import select_device

    try:
        return config_device(name)
    except ConfigError as err:
        device = select_device("auto")
        log.warning("%s: %s; running on %s instead (--set run.device=... chooses)", checkpoint, err, device)
        return device


def load_segmentation_models(
    checkpoints: str | Path | Sequence[str | Path], eval_overrides: list[str] | None = None
) -> LoadedModel | ModelEnsemble:
    """Load one checkpoint as a model, or several as the ensemble of their averaged probabilities.

    Args:
        checkpoints: a ``best.pt`` file of a segmentation run, or several, e.g. one per seed or fold.
        eval_overrides: ``eval.KEY=VALUE`` changes applied to every checkpoint's config.

    Returns:
        The :class:`LoadedModel` of a single checkpoint, else a :class:`ModelEnsemble`.

    Raises:
        CheckpointError: if a file is not a usable segmentation checkpoint, is given twice, or
            the models predict different classes or kinds of studies.
        ValueError: if no checkpoint is given.
    """
    models = [load_segmentation_model(p, eval_overrides=eval_overrides) for p in ensemble_paths(checkpoints)]
    return models[0] if len(models) == 1 else ModelEnsemble(models)


def predict_study(model: LoadedModel | ModelEnsemble, path: str | Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """Predict one study and map the result back onto the source's voxel grid.

    Args:
        model: the loaded model, or an ensemble whose members' probabilities are averaged
            (each on the source grid, after its own preprocessing is inverted).
        path: NIfTI file, DICOM series folder, or 2D image.

    Returns:
        ``(labels, probabilities, reference)``: ``uint8`` labels with the source's shape (after
        the ``eval.min_component_size`` and ``eval.keep_largest`` post-processing), float32
        probabilities ``(K, *shape)`` (before it) and the source
        :class:`~fewlabel.data.readers.Study`.

    Raises:
        DataError: if the study is unreadable, or its kind (2D/3D) does not match the model.
    """
    from fewlabel.data.readers import read_study

    path = Path(path)
    dims = _check_kind(model, path)
    members = model.members
    probs = _source_probabilities(members[0], path, dims)
    for member in members[1:]:
        more = _source_probabilities(member, path, dims)
        if more.shape != probs.shape:  # pragma: no cover - a preprocessing step that Invertd missed
            raise FewLabelError(
                f"{path}: {member.path} predicts shape {more.shape}, {members[0].path} {probs.shape}"
            )
        probs += more
        del more
    if len(members) > 1:
        probs /= len(members)
    # A foreground crop is undone by zero padding; those voxels are background.
    probs[0] = np.clip(1.0 - probs[1:].sum(axis=0), 0.0, 1.0)
    labels = probs.argmax(axis=0).astype(np.uint8)
    reference = read_study(path)
    if labels.shape != reference.array.shape:  # pragma: no cover - a preprocessing step that Invertd missed
        raise FewLabelError(
            f"{path}: the inverted prediction has shape {labels.shape}, the study {reference.array.shape}; "
            f"a preprocessing step could not be inverted"
        )
    rules = model.cfg.eval
    labels = postprocess_labels(
        labels, model.classes, reference.spacing, rules.min_component_size, rules.keep_largest
    )
    return labels, probs, reference


def _source_probabilities(model: LoadedModel, path: Path, dims: int) -> np.ndarray:
    """One network's float32 class probabilities ``(K, *shape)`` on the study's own grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from fewlabel.inference import predict_volume
    from fewlabel.networks.segmentation import size_divisor

    cfg = model.cfg
    preprocessing = model.preprocessing
    data = preprocessing({"image": str(path)})
    image = data["image"]
    probs = predict_volume(
        model.net,
        image,
        cfg.input,
        cfg.eval,
        dims,
        model.device,
        cfg.preprocess.slice_size,
        size_divisor=size_divisor(cfg.model),
        amp=cfg.train.amp,
    )
    if getattr(image, "applied_operations", None):
        data["pred"] = MetaTensor(probs, meta=dict(image.meta))
        inverted = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(
            data
        )
        probs = _as_numpy(inverted["pred"]).astype(np.float32, copy=False)
        del inverted
    else:  # nothing geometric was applied (2D images): the prediction is on the source grid already
        probs = probs.numpy()
    return probs


def _as_numpy(value: Any) -> np.ndarray:
    as_tensor = getattr(value, "as_tensor", None)
    value = as_tensor() if callable(as_tensor) else value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def predict(
    checkpoint: Path | Sequence[Path],
    inputs: list[Path],
    output: Path,
    overwrite: bool = False,
    eval_overrides: list[str] | None = None,
) -> Path:
    """Write a mask for every study given, on the study's own voxel grid.

    Volumes give ``<case>.nii.gz`` (the source's affine and shape), 2D images ``<case>.png``.
    With ``eval.save_probabilities`` the class probabilities are written too:
    ``<case>_probabilities.nii.gz`` (``X, Y, Z, K``, float32) for volumes, one 8-bit
    ``<case>_prob_<class>.png`` per foreground class for 2D images. ``predictions.csv`` lists
    every case with the size of each predicted class (voxels, and millilitres for volumes)
    and its :func:`~fewlabel.inference.uncertainty.mask_uncertainty`;
    with ``overwrite`` it keeps the rows of other cases whose masks are still in the folder.
    Every study is opened before anything is written; if one fails later (e.g. its voxels
    cannot be decoded), the studies predicted before it are listed and the error is raised.
    Several checkpoints predict as one :class:`ModelEnsemble` (probabilities averaged).

    Args:
        checkpoint: the model checkpoint, or several to average.
        inputs: NIfTI files, DICOM series folders, 2D images, folders of those, or ``.txt``
            files listing them one per line.
        output: destination folder (created); must not be one of the input folders.
        overwrite: replace existing outputs of the same names.

    Returns:
        The output folder.

    Raises:
        DataError: for missing or unreadable inputs, duplicate case names, outputs that exist
            already (without ``overwrite``) or an output folder inside an input folder.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(
            output, "is a file; a segmentation model writes its masks and predictions.csv into a folder"
        )
    if not output.exists() and output.suffix.lower() == ".csv":
        # A grading model writes a CSV; this one would make a folder named like one.
        raise DataError(
            output,
            f"a segmentation model writes its masks and predictions.csv into a folder; give a folder "
            f"such as {output.with_suffix('')}",
        )
    model = load_segmentation_models(checkpoint, eval_overrides=eval_overrides)
    collected = _collect(inputs)
    studies = [path for path, _ in collected]
    names = [name for _, name in collected]
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    refuse_inside_inputs(output, folders + [p for p in studies if p.is_dir()])
    # A file's own folder is refused (a mask may take the name of its scan there); a new
    # subfolder beside the scan, the usual place for one scan's prediction, is not.
    if output.resolve() in {p.parent.resolve() for p in studies if p.is_file()}:
        raise DataError(output, "is the folder of an input file; choose another output")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            None, f"several inputs share the case name(s) {duplicates}; predict them into separate folders"
        )
    planned = {n: _outputs_for(n, p, model) for n, p in zip(names, studies, strict=True)}
    _refuse_shared_outputs(planned)
    existing = [f for files in planned.values() for f in files if (output / f).exists()]
    if (output / "predictions.csv").exists():
        existing.append("predictions.csv")
    if existing and not overwrite:
        raise DataError(
            output, f"outputs exist already ({short_list(existing)}); pass --overwrite to replace them"
        )
    from fewlabel.data.readers import check_study_opens, write_mask

    # A study of the wrong kind, or one that does not even open, fails the run before
    # anything is written.
    for path in studies:
        _check_kind(model, path)
        check_study_opens(path)
    output.mkdir(parents=True, exist_ok=True)
    if isinstance(model, ModelEnsemble):
        log.info("averaging %d models: %s", len(model.members), ", ".join(str(m.path) for m in model.members))
    manifest = output / "predictions.csv"
    earlier = _earlier_rows(manifest, output) if overwrite else []
    rows: list[dict] = []

    def listing() -> list[dict]:
        # Earlier rows stay for every case this call has not (yet) replaced: their masks are
        # still in the folder, whether or not this call meant to predict them again.
        done = {row["case"] for row in rows}
        return [row for row in earlier if row["case"] not in done] + rows

    with torch_threads(model.cfg.run.num_threads):
        for name, path in zip(names, studies, strict=True):
            try:
                labels, probs, reference = predict_study(model, path)
            except BaseException:
                # Hours of prediction are not lost to one bad study, an out-of-memory error or
                # Ctrl-C: what is done is listed.
                if rows:
                    _write_manifest(manifest, listing())
                    log.warning(
                        "%d of %d studies were predicted before %s failed; they are listed in %s "
                        "(predict the rest into the same folder with --overwrite)",
                        len(rows),
                        len(studies),
                        path,
                        manifest,
                    )
                raise
            mask_path = write_mask(labels, reference, output / planned[name][0])
            if model.cfg.eval.save_probabilities:
                _write_probabilities(probs, reference, output, name, model.classes)
            elif overwrite:
                # An earlier call's maps would sit beside the new mask as if they were its own.
                for stale in _probability_files(name, model.classes):
                    (output / stale).unlink(missing_ok=True)
            rows.append(_manifest_row(name, path, mask_path, labels, probs, reference, model.classes))
            log.info("predicted %s -> %s", path, mask_path)
            del labels, probs, reference
    _write_manifest(manifest, listing())
    return output


def _earlier_rows(manifest: Path, output: Path) -> list[dict]:
    """Rows of an existing ``predictions.csv`` whose masks are still in the folder.

    Predicting more studies into a folder with ``--overwrite`` then keeps the manifest a
    listing of every mask in it, not only of the latest call's.
    """
    if not manifest.is_file():
        return []
    try:
        with manifest.open(newline="", encoding="utf-8") as f:
            rows = [{k: _read_cell(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        log.warning("%s: unreadable (%s); it is replaced by a listing of this call's cases", manifest, err)
        return []
    kept = []
    for row in rows:
        mask = Path(row.get("mask") or "")
        if row.get("case") and (output / mask.name).is_file():
            kept.append(row)
    return kept


def collect_studies(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand inputs into a list of studies.

    Args:
        inputs: NIfTI files, 2D images, DICOM series folders, folders holding any of those
            (files one level deep; DICOM series folders at any depth, as PACS exports nest
            them under patient and study folders), or ``.txt`` files listing paths (relative
            to the list's folder).

    Returns:
        The studies, in the order given (folders sorted by name).

    Raises:
        DataError: for missing paths, unsupported files, or folders with nothing to predict.
    """
    return [path for path, _ in _collect(inputs)]


def _collect(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """The studies of :func:`collect_studies`, each with its case name.

    A series found below a subfolder of an input folder is named after its path from that
    folder (``P001/CT/`` gives ``P001_CT``): exports often name every series folder alike.
    """
    from fewlabel.data.images import is_image_file
    from fewlabel.data.readers import is_nifti_file, refuse_dicom_file

    studies: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(path, "input not found")
        if path.is_file():
            if path.suffix.lower() == ".txt":
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        path, f"is not a UTF-8 text list of paths ({err.reason} at byte {err.start})"
                    ) from err
                lines = [ln.strip() for ln in text.splitlines()]
                listed = [
                    Path(ln) if Path(ln).is_absolute() else path.parent / ln
                    for ln in lines
                    if ln and not ln.startswith("#")
                ]
                if not listed:
                    raise DataError(path, "the list names no studies")
                studies.extend(_collect(listed))
            elif is_nifti_file(path) or is_image_file(path):
                studies.append((path, case_name(path)))
            else:
                refuse_dicom_file(path)
                raise DataError(
                    path,
                    "unsupported input; expected .nii/.nii.gz, a 2D image, a DICOM folder or a .txt list",
                )
        elif _is_dicom_folder(path):
            studies.append((path, case_name(path)))
        else:
            found = [
                (p, case_name(p))
                for p in sorted(path.iterdir())
                if p.is_file() and (is_nifti_file(p) or is_image_file(p))
            ]
            found.extend((series, "_".join(series.relative_to(path).parts)) for series in _series_below(path))
            if not found:
                raise DataError(
                    path,
                    "holds no NIfTI files or 2D images, and no DICOM series in any of its subfolders",
                )
            studies.extend(sorted(found, key=lambda item: item[0].relative_to(path).parts))
    return studies


def _series_below(folder: Path) -> list[Path]:
    """DICOM series folders anywhere below ``folder`` (not descending into a series)."""
    found: list[Path] = []
    seen = {folder.resolve()}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            subfolders = [p for p in current.iterdir() if p.is_dir()]
            for sub in subfolders:
                real = sub.resolve()
                # Hidden folders hold tool state, not studies; a link back up would loop forever.
                if sub.name.startswith(".") or real in seen:
                    continue
                seen.add(real)
                if _is_dicom_folder(sub):
                    found.append(sub)
                else:
                    pending.append(sub)
        except OSError as err:
            where = Path(err.filename) if err.filename else current
            raise DataError(where, f"cannot be searched for DICOM series: {err.strerror or err}") from err
    return sorted(found)


def _is_dicom_folder(folder: Path) -> bool:
    from fewlabel.data.readers import looks_like_dicom

    # The first files decide: a series folder holds nothing but slices, often thousands.
    # A DICOMDIR (the index of a CD or PACS export) lies above the series, not among them.
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")[:21]
    return any(looks_like_dicom(p) for p in files)


def mask_suffix(reference_or_dims: Any) -> str:
    """File suffix of a predicted mask: ``.png`` for 2D images, ``.nii.gz`` for volumes.

    Args:
        reference_or_dims: the source :class:`~fewlabel.data.readers.Study`, or its number of
            spatial dimensions.

    Returns:
        The suffix.
    """
    dims = reference_or_dims if isinstance(reference_or_dims, int) else reference_or_dims.array.ndim
    return ".png" if dims == 2 else ".nii.gz"


def _refuse_shared_outputs(planned: dict[str, list[str]]) -> None:
    """Refuse two cases that would write the same file (``a``'s probabilities, case ``a_probabilities``)."""
    owners: dict[str, list[str]] = {}
    for case, files in planned.items():
        for name in files:
            owners.setdefault(name, []).append(case)
    owners.setdefault("predictions.csv", []).append("the manifest")
    shared = {name: cases for name, cases in owners.items() if len(cases) > 1}
    if shared:
        name, cases = next(iter(shared.items()))
        raise DataError(
            None,
            f"cases {' and '.join(repr(c) for c in cases)} would both write {name}"
            + (f" ({len(shared) - 1} more such files)" if len(shared) > 1 else "")
            + "; rename one of the inputs or predict them into separate folders",
        )


def _outputs_for(name: str, path: Path, model: LoadedModel | ModelEnsemble) -> list[str]:
    dims = _study_dims(path)
    files = [name + mask_suffix(dims)]
    if model.cfg.eval.save_probabilities:
        files.extend(
            f for f in _probability_files(name, model.classes) if f.endswith(".nii.gz") == (dims == 3)
        )
    return files


def _probability_files(name: str, classes: list[str]) -> list[str]:
    """The probability maps ``eval.save_probabilities`` writes for case ``name``, volume or image."""
    return [f"{name}_probabilities.nii.gz", *(f"{name}_prob_{c}.png" for c in classes[1:])]


def _write_probabilities(
    probs: np.ndarray, reference: Any, output: Path, name: str, classes: list[str]
) -> None:
    if reference.array.ndim == 2:
        from PIL import Image

        for k, cls in enumerate(classes[1:], start=1):
            image = Image.fromarray(np.round(probs[k] * 255).astype(np.uint8), mode="L")
            atomic_write(output / f"{name}_prob_{cls}.png", lambda p, im=image: im.save(p, format="PNG"))
        return
    from fewlabel.data.readers import write_on_grid

    channels_last = np.moveaxis(probs, 0, -1).astype(np.float32)
    write_on_grid(
        channels_last, reference, output / f"{name}_probabilities.nii.gz", "fewlabel class probabilities"
    )


def _manifest_row(
    name: str,
    path: Path,
    mask: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    reference: Any,
    classes: list[str],
) -> dict:
    from fewlabel.inference.uncertainty import mask_uncertainty

    counts = np.bincount(labels.ravel(), minlength=len(classes))
    row: dict[str, Any] = {"case": name, "input": str(path), "mask": str(mask)}
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0 if labels.ndim == 3 else None
    for k, cls in enumerate(classes[1:], start=1):
        row[f"{cls}_voxels"] = int(counts[k])
        if voxel_ml is not None:
            row[f"{cls}_ml"] = round(counts[k] * voxel_ml, 3)
    row["uncertainty"] = round(mask_uncertainty(probs), 4)
    return row


#: Manifest columns holding names and paths (the others hold numbers).
_TEXT_COLUMNS = ("case", "input", "mask")


def _read_cell(column: str | None, value: str | None) -> str | None:
    return unescape_cell(value) if column in _TEXT_COLUMNS and isinstance(value, str) else value


def _write_manifest(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = [columns] + [
        [escape_cell(str(row[k])) if k in _TEXT_COLUMNS and k in row else row.get(k, "") for k in columns]
        for row in rows
    ]
    atomic_write_text(path, csv_text(table))


def refuse_inside_inputs(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that is, or lies inside, one of the input folders.

    Args:
        output: the folder about to be written.
        inputs: folders (or files, standing for their folders) that are read.

    Raises:
        DataError: naming ``output`` and the input folder it would write into.
    """
    for folder in inputs:
        folder = Path(folder).resolve()
        if folder.is_file():
            folder = folder.parent
        if lies_within(output, folder):
            raise DataError(
                output, f"refusing to write into the input folder {folder}; choose another output"
            )


def _check_kind(model: LoadedModel | ModelEnsemble, path: Path) -> int:
    """The study's spatial dimensions, refused when the model predicts the other kind."""
    dims = _study_dims(path)
    if dims != model.spatial_dims:
        kinds = {2: "2D images", 3: "3D volumes"}
        raise DataError(
            path, f"is one of the {kinds[dims]}, but the model was trained on {kinds[model.spatial_dims]}"
        )
    return dims


def _study_dims(path: str | Path) -> int:
    from fewlabel.data.readers import is_volume_path

    return 3 if is_volume_path(path) else 2
