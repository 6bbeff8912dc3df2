"""Performance benchmark of fewlabel: one table, every figure measured in the same run.

Measurements (each against its target):

a. Classifier training throughput (images/s) of fewlabel's Ignite training loop, with its
   iteration handlers, against a minimal hand-written PyTorch loop doing the same work: the
   same GoogLeNet, loader (dataset, transforms, resumable sampler), optimizer parameter groups
   and auxiliary loss. Epoch times exclude the epoch-end work (checkpoint, history), the
   first epoch of every run is warm-up, and the figure is the median over the timed epochs
   of alternating runs. Target: overhead ratio <= 1.05.
b. Segmentation epoch time (3D patches from synthetic CT volumes resampled by
   ``preprocess.spacing``) with ``data.cache: true`` (MONAI ``CacheDataset``) against
   ``data.cache: false``, from ``history.csv`` of real ``fewlabel train`` runs, from the
   second epoch on. Target: cached >= 3x faster.
c. One TCSM iteration against one supervised iteration on the same labelled batch
   (``scripts/bench_tcsm_iteration.py``): consistency on that batch only, and with an
   equal-size unlabelled batch. Target: <= 1.6x.
d. ``fewlabel predict`` on a CT-sized int16 NIfTI volume (512x512x300) with a 2.5D BasicUNet
   checkpoint (random weights, the shipped ``ct_tcsm.yaml`` preprocessing): wall time and peak
   RSS of a fresh process (``resource.getrusage``), in GB (10**9 bytes). Target: <= 4 GB.
e. Mixed precision. On CUDA: classifier training with AMP on and off (images/s and
   ``torch.cuda.max_memory_allocated``). On the CPU: one TCSM iteration at the COVID study's
   size with ``train.cpu_amp`` (bfloat16 autocast) against float32.

Usage::

    python scripts/bench.py                 # full run (about 11 minutes on 2 busy CPU cores)
    python scripts/bench.py --quick         # smoke run at toy sizes (a minute or two)
    python scripts/bench.py --json bench.json --only a c

The markdown table goes to stdout (logs to stderr). The machine, torch's thread count and
the load average before and after are printed too, because other processes on the machine
change the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ignite's ProgressBar draws with tqdm; disabled here so the loops are timed without it.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import yaml

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine the numbers come from.

    Args:
        device: the device the measurements run on (``--device``), not merely the best one
            present: a ``--device cpu`` run on a GPU machine is a CPU measurement.

    Returns:
        CPU, cores, library versions and the device, as printed above the table.
    """
    import monai

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
    return info


# ---------------------------------------------------------------------------------------------
# a. classifier throughput: fewlabel's engine loop against a hand-written loop
# ---------------------------------------------------------------------------------------------


def _classification_setup(work: Path, image_size: int, batch: int, iterations: int, amp: bool = False):
    from fewlabel.config.classification import ClassificationExperiment
    from fewlabel.data.classification import load_classification_dataset
    from fewlabel.data.synthetic_fundus import make_synthetic_fundus

    num_classes = 5
    n_per_class = -(-batch * iterations // num_classes)
    # Named by what generates it: a --workdir reused at other sizes (or after --quick) must
    # not hand back data of the old sizes while the table reports the new ones.
    data = work / f"fundus-{image_size}px-{num_classes}x{n_per_class}"
    if not data.exists():
        make_synthetic_fundus(data, n_per_class=n_per_class, num_classes=num_classes, size=image_size, seed=0)
    cfg = ClassificationExperiment.model_validate(
        {
            "task": "classification",
            "run": {"output_dir": str(work / "runs"), "seed": 0, "device": "auto"},
            "data": {"path": str(data), "val_fraction": 0.0, "test_fraction": 0.0, "cache": True},
            "model": {"weights": "none", "image_size": image_size, "freeze": "conv3", "aux_logits": True},
            "train": {"batch_size": batch, "optimizer": "sgd", "scheduler": "none", "amp": amp},
        }
    )
    dataset = load_classification_dataset(cfg.data, cfg.run.seed)
    # Exactly `iterations` full batches per epoch in both loops.
    dataset.splits["train"] = dataset.splits["train"][: batch * iterations]
    return cfg, dataset


def _fewlabel_epochs(cfg, dataset, work: Path, epochs: int, device: torch.device) -> list[list[float]]:
    """Seconds of every iteration of ``train_classifier``, per epoch.

    An iteration's time runs from the end of the previous one (or the epoch start) to its
    own end: data loading, the step and the iteration handlers. Epoch-end work (checkpoint,
    history) is outside every interval.
    """
    import fewlabel.engines.classification as engine_module
    from fewlabel.runs import create_run_dir

    times: list[list[float]] = []
    original = engine_module.Engine

    class TimedEngine(original):  # type: ignore[misc, valid-type]
        # Registered before fewlabel's own handlers, which then count in the next interval.
        def __init__(self, process_function: Callable) -> None:
            super().__init__(process_function)
            last = [0.0]

            @self.on(engine_module.Events.EPOCH_STARTED)
            def _start(_: Any) -> None:
                _sync(device)
                times.append([])
                last[0] = time.perf_counter()

            @self.on(engine_module.Events.ITERATION_COMPLETED)
            def _tick(_: Any) -> None:
                _sync(device)
                now = time.perf_counter()
                times[-1].append(now - last[0])
                last[0] = now

    cfg = cfg.model_copy(deep=True)
    cfg.train.max_epochs = epochs
    run = create_run_dir(work / "runs", None, "bench", overwrite=True)
    torch.manual_seed(0)
    engine_module.Engine = TimedEngine
    try:
        engine_module.train_classifier(cfg, run, dataset, device)
    finally:
        engine_module.Engine = original
    return times


def _manual_epochs(cfg, dataset, epochs: int, device: torch.device) -> list[list[float]]:
    """The same work as fewlabel's fine-tuning step, written as a bare PyTorch loop."""
    from monai.data import DataLoader

    from fewlabel.data.classification_transforms import (
        build_augment_transforms,
        build_decode_transforms,
        make_dataset,
        normalization_for,
    )
    from fewlabel.data.sampling import ResumableSampler
    from fewlabel.engines.classification import AuxiliaryLoss, build_optimizer
    from fewlabel.networks.googlenet import build_googlenet, parameter_groups
    from fewlabel.utils.runtime import autocast

    torch.manual_seed(0)
    records = dataset.splits["train"]
    mean, std = normalization_for(cfg.model.weights)
    model = build_googlenet(
        len(dataset.classes), cfg.model.weights, cfg.model.freeze, cfg.model.dropout, cfg.model.aux_logits
    ).to(device)
    ds = make_dataset(
        records,
        build_decode_transforms(cfg.model.image_size),
        build_augment_transforms(True, cfg.augment, mean, std),
        cache=cfg.data.cache,
        seed=cfg.run.seed,
    )
    sampler = ResumableSampler(len(records), seed=cfg.run.seed, shuffle=True)
    loader = DataLoader(
        ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=0, pin_memory=device.type == "cuda"
    )
    groups = parameter_groups(model, cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.weight_decay)
    optimizer = build_optimizer(groups, cfg.train)
    criterion = AuxiliaryLoss(aux_weight=cfg.model.aux_weight, label_smoothing=cfg.train.label_smoothing).to(
        device
    )
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    times: list[list[float]] = []
    for _ in range(epochs):
        _sync(device)
        times.append([])
        last = time.perf_counter()
        for batch in loader:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True).view(-1)
            with autocast(device, amp):
                logits, aux = model.forward_train(x)
            loss = criterion(logits, aux, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            float(loss.detach())  # fewlabel's step returns the loss as a number too
            _sync(device)
            now = time.perf_counter()
            times[-1].append(now - last)
            last = now
    return times


def bench_classifier(args: argparse.Namespace, work: Path, device: torch.device) -> list[dict]:
    size, batch, iters = (64, 8, 3) if args.quick else (args.image_size, args.batch, args.iterations)
    repeats, timed = (1, 2) if args.quick else (args.repeats, 2)
    cfg, dataset = _classification_setup(work / "cls", size, batch, iters)
    ours: list[float] = []
    manual: list[float] = []
    for r in range(repeats):
        # Alternating runs, first epoch of each as warm-up: a change in machine load hits both
        # loops alike, and the median iteration ignores bursts from other processes.
        ours += [
            t for epoch in _fewlabel_epochs(cfg, dataset, work / "cls", timed + 1, device)[1:] for t in epoch
        ]
        manual += [t for epoch in _manual_epochs(cfg, dataset, timed + 1, device)[1:] for t in epoch]
        log.info(
            "classifier repeat %d/%d: median iteration fewlabel %.3f s, hand-written %.3f s",
            r + 1,
            repeats,
            statistics.median(ours),
            statistics.median(manual),
        )
    a, b = batch / statistics.median(ours), batch / statistics.median(manual)
    ratio = b / a
    return [
        {
            "id": "a",
            "measure": f"GoogLeNet training, {size} px, batch {batch} (images/s: fewlabel engine vs hand-written loop)",
            "value": f"{a:.2f}",
            "reference": f"{b:.2f}",
            "ratio": f"{ratio:.3f}x time",
            "target": "<= 1.05x",
            "met": ratio <= 1.05,
            "raw": {
                "fewlabel_iteration_s": ours,
                "manual_iteration_s": manual,
                "iterations_per_epoch": iters,
                "fewlabel_mean_img_s": batch / statistics.mean(ours),
                "manual_mean_img_s": batch / statistics.mean(manual),
            },
        }
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# b. segmentation epoch time: cached vs uncached preprocessing
# ---------------------------------------------------------------------------------------------


def bench_cache(args: argparse.Namespace, work: Path) -> list[dict]:
    from fewlabel.cli import main as cli_main
    from fewlabel.config import parse_config
    from fewlabel.data.synthetic_ct import make_synthetic_ct

    # Big enough that reading and resampling a volume costs more than a training step on it.
    shape = (64, 64, 32) if args.quick else (256, 256, 128)
    n_vol = 3 if args.quick else 6
    patch = [32, 32, 16] if args.quick else [64, 64, 32]
    # Named by what generates it (see _classification_setup): a reused --workdir regenerates.
    data = work / f"ct-{n_vol}x{'x'.join(map(str, shape))}"
    if not data.exists():
        make_synthetic_ct(data, n_labeled=n_vol, n_unlabeled=0, shape=shape, seed=0)
    epochs, rounds = 3, (1 if args.quick else 3)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    loading: dict[bool, list[float]] = {True: [], False: []}
    for cache in [True, False] * rounds:
        # Alternating runs: a change in machine load hits both settings alike.
        cfg = {
            "task": "segmentation",
            "run": {"output_dir": str(work / "seg"), "name": f"cache-{cache}", "seed": 0, "device": "cpu"},
            "data": {
                "path": str(data),
                "val_fraction": 0.0,
                "test_fraction": 0.0,
                "cache": cache,
                "num_workers": 0,
            },
            # Synthetic spacing is 0.8 x 0.8 x 2.5 mm: resampling to 1 x 1 x 2 mm costs real work.
            "preprocess": {"modality": "ct", "orientation": "RAS", "spacing": [1.0, 1.0, 2.0]},
            "input": {"mode": "3d", "patch_size": patch, "patches_per_volume": 2},
            "model": {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4]},
            "train": {"max_epochs": epochs, "batch_size": 2, "val_every": 1000},
        }
        path = work / f"seg-cache-{cache}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table
            if cli_main(["train", str(path), "--overwrite"]) != 0:
                raise RuntimeError("segmentation training failed")
        import csv

        with open(work / "seg" / f"cache-{cache}" / "history.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        seconds[cache] += [float(r["seconds"]) for r in rows[1:]]  # from the second epoch on
        log.info("segmentation epochs (cache=%s): %s s", cache, [r["seconds"] for r in rows])
        loading[cache] += _loader_epochs(parse_config(cfg), epochs)[1:]
        log.info(
            "data loading alone (cache=%s): %s s", cache, [round(t, 2) for t in loading[cache][-epochs + 1 :]]
        )
    cached, uncached = statistics.median(seconds[True]), statistics.median(seconds[False])
    speedup = uncached / cached
    load_cached, load_uncached = statistics.median(loading[True]), statistics.median(loading[False])
    return [
        {
            "id": "b",
            "measure": (
                f"segmentation epoch, {n_vol} CT volumes {'x'.join(map(str, shape))} resampled, 3D patches "
                f"{'x'.join(map(str, patch))} (s: cached vs uncached)"
            ),
            "value": f"{cached:.2f}",
            "reference": f"{uncached:.2f}",
            "ratio": f"{speedup:.1f}x faster",
            "target": ">= 3x faster",
            "met": speedup >= 3.0,
            "raw": {"cached_s": seconds[True], "uncached_s": seconds[False]},
        },
        {
            "id": "b2",
            "measure": "the same epoch's data loading alone (s: cached vs uncached; the training loader iterated, no step)",
            "value": f"{load_cached:.2f}",
            "reference": f"{load_uncached:.2f}",
            "ratio": f"{load_uncached / load_cached:.1f}x faster",
            "target": "",
            "met": None,
            "raw": {"cached_s": loading[True], "uncached_s": loading[False]},
        },
    ]


def _loader_epochs(cfg: Any, epochs: int) -> list[float]:
    """Seconds to iterate the training loader of ``fewlabel train`` for each of ``epochs`` epochs."""
    from fewlabel.data.segmentation import build_datalist
    from fewlabel.pipelines.segmentation import _loader

    datalist = build_datalist(cfg.data, cfg.run.seed)
    loader = _loader(datalist.train, cfg, list(datalist.classes), True, cfg.train.batch_size, None)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# c. TCSM iteration against a supervised iteration
# ---------------------------------------------------------------------------------------------


def bench_tcsm(args: argparse.Namespace, device: torch.device) -> list[dict]:
    sys.path.insert(0, str(SCRIPTS))
    import bench_tcsm_iteration as tcsm_bench

    ns = argparse.Namespace(
        size=64 if args.quick else 128,
        depth=0,
        channels=1,
        classes=2,
        features=(8, 8, 16, 32, 64, 8) if args.quick else (16, 16, 32, 64, 128, 16),
        reps=3 if args.quick else 12,
        warmup=1 if args.quick else 3,
        amp=device.type == "cuda",
    )
    batch = 2 if args.quick else 4
    rounds = 1 if args.quick else 3
    tcsm_bench._time_case(ns, device, batch, batch, True)  # untimed: one-off allocator/kernel costs
    cases = {"supervised": (0, False), "labelled_only": (0, True), "with_unlabelled": (batch, True)}
    medians: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        # Interleaved rounds: load from other processes spreads over the three cases alike.
        for key, (n_unlabeled, enabled) in cases.items():
            medians[key].append(tcsm_bench._time_case(ns, device, batch, n_unlabeled, enabled))
    log.info("TCSM median iteration per round (s): %s", medians)
    supervised, labelled_only, with_unlabelled = (statistics.median(medians[k]) for k in cases)
    setting = f"2D BasicUNet {ns.features}, {ns.size}x{ns.size}, {batch} labelled"
    rows = []
    for key, name, seconds in (
        ("c1", f"TCSM iteration, consistency on the same labelled batch only ({setting})", labelled_only),
        (
            "c2",
            f"TCSM iteration with an equal-size unlabelled batch ({setting} + {batch} unlabelled)",
            with_unlabelled,
        ),
    ):
        ratio = seconds / supervised
        rows.append(
            {
                "id": key,
                "measure": name + " (ms: TCSM vs supervised)",
                "value": f"{seconds * 1e3:.1f}",
                "reference": f"{supervised * 1e3:.1f}",
                "ratio": f"{ratio:.2f}x time",
                "target": "<= 1.6x",
                "met": ratio <= 1.6,
                "raw": {"tcsm_s": seconds, "supervised_s": supervised},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# d. whole-volume prediction: time and peak memory
# ---------------------------------------------------------------------------------------------


def _write_ct_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """An int16 chest-like phantom (air, body, two lungs, noise) as NIfTI."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1
    lungs = (((x - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 <= 1) | (((x + 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 <= 1)
    plane = np.where(body, np.where(lungs, -850, 40), -1000).astype(np.int16)
    volume = np.repeat(plane[:, :, None], shape[2], axis=2)
    volume += rng.integers(-20, 21, size=shape, dtype=np.int16)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    img = nib.Nifti1Image(volume, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _segmentation_checkpoint(path: Path) -> dict:
    from fewlabel.config import parse_config
    from fewlabel.engines.checkpoint import save_checkpoint
    from fewlabel.engines.segmentation import checkpoint_meta
    from fewlabel.networks.segmentation import build_segmentation_net

    raw = yaml.safe_load((REPO / "configs" / "ct_tcsm.yaml").read_text(encoding="utf-8"))
    raw["data"]["path"] = str(path.parent)
    raw["run"]["device"] = "cpu"
    # Random weights: memory and time depend on the sizes, not on what the network learned.
    raw["model"]["features"] = [8, 8, 16, 32, 64, 8]
    cfg = parse_config(raw)
    classes = ["background", "ggo", "consolidation"]
    in_channels = cfg.input.slab
    torch.manual_seed(0)
    net = build_segmentation_net(cfg.model, 2, in_channels, len(classes))
    save_checkpoint({"model": net.state_dict(), "meta": checkpoint_meta(cfg, classes, 3, in_channels)}, path)
    return raw


def bench_predict(args: argparse.Namespace, work: Path) -> list[dict]:
    shape = (256, 256, 48) if args.quick else tuple(args.volume)
    folder = work / "predict"
    folder.mkdir(parents=True, exist_ok=True)
    # One input folder per shape, so that a reused --workdir never predicts an old --volume.
    volume = folder / f"input-{'x'.join(map(str, shape))}" / "ct.nii.gz"
    volume.parent.mkdir(exist_ok=True)
    if not volume.exists():
        _write_ct_volume(volume, shape)
    checkpoint = folder / "model.pt"
    raw = _segmentation_checkpoint(checkpoint)
    out = folder / "out"
    code = textwrap.dedent(
        f"""
        import resource, sys, time
        import torch
        from fewlabel.cli import main
        if {args.threads}:
            torch.set_num_threads({args.threads})
        start = time.perf_counter()
        rc = main(["predict", "--checkpoint", {str(checkpoint)!r}, {str(volume)!r}, "--output", {str(out)!r}, "--overwrite"])
        seconds = time.perf_counter() - start
        print("BENCH", rc, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    # A fresh process: its peak resident set is the prediction's (plus the interpreter's).
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")), None)
    if proc.returncode != 0 or line is None or line.split()[1] != "0":
        raise RuntimeError(f"prediction failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, _rc, seconds, maxrss_kb = line.split()
    # ru_maxrss is in KiB on Linux; the target is in GB (10**9 bytes), not GiB.
    peak_gb = int(maxrss_kb) * 1024 / 1e9
    setting = (
        f"{raw['input']['mode']} slab {raw['input']['slab']}, slices {raw['preprocess']['slice_size']}, "
        f"crop_foreground {raw['preprocess']['crop_foreground']}, 3 classes"
    )
    return [
        {
            "id": "d",
            "measure": f"fewlabel predict, int16 NIfTI {'x'.join(map(str, shape))} ({setting}): peak RSS GB (time s)",
            "value": f"{peak_gb:.2f}",
            "reference": f"{float(seconds):.1f} s",
            "ratio": "",
            "target": "<= 4 GB",
            "met": peak_gb <= 4.0,
            "raw": {"peak_rss_gb": peak_gb, "seconds": float(seconds), "shape": list(shape)},
        }
    ]


# ---------------------------------------------------------------------------------------------
# e. mixed precision: AMP on CUDA, bfloat16 on the CPU
# ---------------------------------------------------------------------------------------------


def bench_cpu_amp(args: argparse.Namespace) -> list[dict]:
    """TCSM iteration at the COVID study's size, bfloat16 (``train.cpu_amp``) against float32."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_tcsm_iteration as tcsm_bench

    size, batch = (64, 2) if args.quick else (192, 6)
    features = (8, 8, 16, 32, 64, 8) if args.quick else (32, 32, 64, 128, 256, 32)
    cpu = torch.device("cpu")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(1 if args.quick else 3):
        for bf16 in (True, False):
            ns = argparse.Namespace(
                size=size,
                depth=0,
                channels=1,
                classes=3,
                features=features,
                reps=2 if args.quick else 5,
                warmup=1 if args.quick else 2,
                amp=False,
                cpu_amp=bf16,
            )
            if round_ == 0 and bf16:
                tcsm_bench._time_case(ns, cpu, batch, batch, True)  # untimed warm-up
            seconds[bf16].append(tcsm_bench._time_case(ns, cpu, batch, batch, True))
    log.info("TCSM iteration per round (s), bf16: %s, fp32: %s", seconds[True], seconds[False])
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    return [
        {
            "id": "e",
            "measure": (
                f"TCSM iteration, 2D BasicUNet {features}, {size}x{size}, {batch} labelled + {batch} "
                "unlabelled, on the CPU (s: train.cpu_amp bfloat16 vs float32)"
            ),
            "value": f"{on:.2f}",
            "reference": f"{off:.2f}",
            "ratio": f"{off / on:.2f}x faster",
            "target": "",
            "met": None,
            "raw": {"bf16_s": on, "fp32_s": off},
        }
    ]


def bench_amp(args: argparse.Namespace, work: Path, device: torch.device) -> list[dict]:
    if device.type != "cuda":
        return bench_cpu_amp(args)
    size, batch, iters = (64, 8, 3) if args.quick else (224, 32, 10)
    results = {}
    for amp in (True, False):
        cfg, dataset = _classification_setup(work / f"amp-{amp}", size, batch, iters, amp=amp)
        torch.cuda.reset_peak_memory_stats(device)
        # Per-iteration times after the first (warm-up) epoch, as row a measures them.
        times = [
            t for epoch in _fewlabel_epochs(cfg, dataset, work / f"amp-{amp}", 3, device)[1:] for t in epoch
        ]
        results[amp] = (
            batch / statistics.median(times),
            torch.cuda.max_memory_allocated(device) / 1024**3,
        )
    (on, mem_on), (off, mem_off) = results[True], results[False]
    return [
        {
            "id": "e",
            "measure": f"GoogLeNet training {size} px batch {batch}, AMP on vs off (images/s; peak GPU memory GiB)",
            "value": f"{on:.1f} ({mem_on:.2f} GiB)",
            "reference": f"{off:.1f} ({mem_off:.2f} GiB)",
            "ratio": f"{on / off:.2f}x faster",
            "target": "",
            "met": None,
            "raw": {"amp_img_s": on, "fp32_img_s": off, "amp_gib": mem_on, "fp32_gib": mem_off},
        }
    ]


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    lines = [
        "| | measurement | fewlabel | reference | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['id']} | {r['measure']} | {r['value']} | {r['reference']} | {r['ratio']} | {r['target']} | {met} |"
        )
    return "\n".join(lines)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run, not a measurement")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--only", nargs="+", choices=list("abcde"), help="run only these measurements")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (a, c, e)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one thread is far steadier on a machine shared with other jobs",
    )
    parser.add_argument("--image-size", type=int, default=96, help="(a) classifier input size")
    parser.add_argument("--batch", type=int, default=16, help="(a) classifier batch size")
    parser.add_argument("--iterations", type=int, default=8, help="(a) iterations per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="(a) alternating runs of each loop")
    parser.add_argument("--volume", type=int, nargs=3, default=(512, 512, 300), help="(d) volume shape")
    parser.add_argument("--workdir", type=Path, help="keep the generated data here (default: a temp folder)")
    return parser.parse_args()


def main() -> None:
    """Run the selected measurements and print the table."""
    args = _parse()
    if args.json is not None and (not args.json.parent.is_dir() or args.json.is_dir()):
        # Found now, not after the measurements (about 11 minutes for all of them).
        raise SystemExit(
            f"--json {args.json}: {'is a folder' if args.json.is_dir() else 'its folder does not exist'}"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fewlabel.utils.runtime import select_device

    device = select_device(args.device)
    selected = args.only or list("abcde")
    info = machine_info(device)
    info["load_before"] = _uptime()
    with tempfile.TemporaryDirectory(prefix="fewlabel-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        steps = {
            "a": lambda: bench_classifier(args, work, device),
            "b": lambda: bench_cache(args, work),
            "c": lambda: bench_tcsm(args, device),
            "d": lambda: bench_predict(args, work),
            "e": lambda: bench_amp(args, work, device),
        }
        for key in selected:
            start = time.perf_counter()
            log.info("measuring %s ...", key)
            rows.extend(steps[key]())
            log.info("%s took %.0f s", key, time.perf_counter() - start)
    info["load_after"] = _uptime()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
        f"threads, MONAI {info['monai']}, device {info['device']} (rows a, c, e)"
        f"{' (quick run)' if args.quick else ''}"
    )
    print(f"before: {info['load_before']}")
    print(f"after:  {info['load_after']}")
    print()
    print(_table(rows))
    if args.json:
        payload = {"machine": info, "quick": args.quick, "results": rows}
        from fewlabel.utils.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
