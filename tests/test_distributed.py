"""Data-parallel training under ``torchrun`` gives the run that one process gives.

A tiny classification run is trained once in this process and once by
``python -m torch.distributed.run --nproc_per_node 2 -m fewlabel train`` (two CPU processes,
gloo). Each process gets half of every global batch of 4 and DDP averages the gradients, so
the two runs should end with the same weights. They are not bit-identical: one process sums
the gradient over 4 images in one reduction, two processes sum 2 + 2 and average the halves
with an all-reduce, a different order of float additions (relative differences ~1e-7 per
step); the test allows 1e-5.

BatchNorm: torch implements ``SyncBatchNorm`` on CUDA only, so on the CPU each process would
normalise its trainable BatchNorm layers with the statistics of its own 2 images instead of
all 4, a genuinely different computation. The comparison therefore trains the head of a
frozen backbone (``model.freeze: all``; frozen layers keep their running statistics), from
a local "pretrained" weights file whose BatchNorm statistics were calibrated so that its
features carry information. On CUDA ``fewlabel`` converts the layers to ``SyncBatchNorm``.

Only rank 0 may write: an audit hook (``sys.addaudithook``, installed in every process of
the distributed run through ``sitecustomize``) logs each file the processes create, replace,
or open for writing inside the run folder, per rank.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from _factories import tiny_classification_config, write_config
from fewlabel.cli import main
from fewlabel.data.synthetic_fundus import make_synthetic_fundus
from fewlabel.engines.checkpoint import load_checkpoint

REL_TOL = 1e-5

_AUDIT = textwrap.dedent(
    """
    import os, sys

    _rank = os.environ.get("RANK")
    _root = os.environ.get("FEWLABEL_AUDIT_ROOT")
    if _rank is not None and _root:
        _fd = os.open(os.environ["FEWLABEL_AUDIT_LOG"] + "." + _rank, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def _inside(path):
            try:
                return os.path.abspath(os.fsdecode(path)).startswith(_root)
            except TypeError:
                return False

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _writes)
                paths = [path] if writing else []
            elif event in ("os.rename", "os.link"):
                paths = list(args[:2])
            elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "tempfile.mkstemp"):
                paths = [args[0]]
            else:
                return
            for p in paths:
                if isinstance(p, (str, bytes, os.PathLike)) and _inside(p):
                    os.write(_fd, (event + " " + os.fsdecode(p) + "\\n").encode())

        sys.addaudithook(_hook)
    """
)


@pytest.fixture(autouse=True)
def _restore_determinism_flag() -> Iterator[None]:
    # run.deterministic switches torch's global flag on; later tests should not inherit it.
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _calibrated_googlenet(path: Path) -> Path:
    """A torchvision-layout GoogLeNet state dict whose BatchNorm statistics fit its weights.

    Randomly initialised layers with default running statistics (mean 0, variance 1) shrink
    activations to ~1e-12 by the bottleneck; a few forward passes with cumulative statistics
    make the frozen features informative, like real pretrained weights.
    """
    from torchvision.models import GoogLeNet

    torch.manual_seed(0)
    net = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=False, init_weights=True)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 32, 32))
    torch.save(net.state_dict(), path)
    return path


def _files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _assert_close(a: float | None, b: float | None, what: str) -> None:
    if a is None or b is None:
        assert a is b, what
    else:
        assert math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6), f"{what}: {a} != {b}"


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    weights = _calibrated_googlenet(tmp_path / "backbone.pt")
    # 24 images: 12 train (3 global batches of 4), 6 validation (3 per rank), 6 test.
    data = make_synthetic_fundus(tmp_path / "fundus", n_per_class=8, num_classes=3, size=32)
    configs = {}
    for name in ("one", "two"):
        cfg = tiny_classification_config(
            data,
            tmp_path / name,
            run={"seed": 3, "deterministic": True},
            model={"weights": str(weights), "freeze": "all", "aux_logits": False, "dropout": 0.0},
            train={
                "max_epochs": 2,
                "batch_size": 4,
                "optimizer": "sgd",
                "lr_head": 3e-4,
                "scheduler": "none",
            },
        )
        configs[name] = write_config(tmp_path / f"{name}.yaml", cfg)

    assert main(["train", str(configs["one"])]) == 0

    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(_AUDIT, encoding="utf-8")
    two_root = tmp_path / "two"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(audit_dir), os.environ.get("PYTHONPATH", "")]),
        "FEWLABEL_AUDIT_ROOT": str(two_root.resolve()),
        "FEWLABEL_AUDIT_LOG": str(audit_dir / "writes"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fewlabel", "train", str(configs["two"])]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1, "only rank 0 announces the run folder"

    one, two = tmp_path / "one" / "run", two_root / "run"
    # Same outputs, nothing partial or temporary left behind.
    assert _files(one) == _files(two)
    assert not [f for f in _files(two) if f.startswith(".") or "/." in f or f.endswith(".tmp")]
    assert json.loads((two / "status.json").read_text())["state"] == "completed"

    # Only rank 0 wrote: the hook saw it write (so it works) and saw nothing from rank 1.
    rank0 = (audit_dir / "writes.0").read_text()
    assert "checkpoints/best.pt" in rank0 and "status.json" in rank0
    rank1 = audit_dir / "writes.1"
    assert not rank1.exists() or rank1.read_text() == "", rank1.read_text()

    # Same weights within the tolerance explained above (the head moved, the backbone did not).
    for name in ("best.pt", "last.pt"):
        a, b = (
            load_checkpoint(one / "checkpoints" / name)["model"],
            load_checkpoint(two / "checkpoints" / name)["model"],
        )
        assert a.keys() == b.keys()
        for key, value in a.items():
            if value.is_floating_point():
                scale = value.abs().max().clamp_min(1e-12)
                assert float((value - b[key]).abs().max() / scale) <= REL_TOL, f"{name}: {key} differs"
            else:
                assert torch.equal(value, b[key]), f"{name}: {key} differs"
    # Same training losses and validation metrics every epoch, and the same final report.
    rows_one, rows_two = _history(one), _history(two)
    assert len(rows_one) == len(rows_two) == 2
    assert rows_one[0]["val_loss"] != rows_one[1]["val_loss"], "the head trained"
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r1.keys() == r2.keys()
        for key in r1:
            if key != "stage":
                _assert_close(float(r1[key]), float(r2[key]), f"history {key}")
    m1 = json.loads((one / "eval" / "metrics.json").read_text())
    m2 = json.loads((two / "eval" / "metrics.json").read_text())
    for key in ("n", "accuracy", "balanced_accuracy", "kappa", "auc", "loss"):
        _assert_close(m1[key], m2[key], f"metrics {key}")
    assert m1["confusion_matrix"] == m2["confusion_matrix"]


def test_resume_position_converts_between_process_counts() -> None:
    from fewlabel.data.sampling import ResumableSampler

    # An epoch of 12 samples in global batches of 4, interrupted after one iteration.
    single = ResumableSampler(12, seed=5)
    single.resume(epoch=0, samples_done=1 * 4)
    rest = list(single)
    shards = []
    for r in range(2):
        sampler = ResumableSampler(12, seed=5, num_replicas=2, rank=r)
        # What the engine does: global batches done x global batch / processes.
        sampler.resume(epoch=0, samples_done=1 * 4 // 2)
        shards.append(list(sampler))
    # The two ranks together continue with exactly the samples (and augmentation seeds) one
    # process would have drawn next.
    assert [s for pair in zip(*shards, strict=True) for s in pair] == rest


def _collectives(local_rank: int) -> None:
    from fewlabel.errors import ConfigError
    from fewlabel.utils.distributed import (
        gather_sharded,
        is_main_process,
        per_rank_batch_size,
        rank,
        sum_over_ranks,
        world_size,
    )

    assert world_size() == 2 and is_main_process() == (rank() == 0)
    # Five rows dealt round-robin: rank 0 holds 0, 2, 4 and rank 1 holds 1, 3.
    local = torch.tensor([[float(i), -float(i)] for i in range(rank(), 5, 2)])
    assert gather_sharded(local, 5).tolist() == [[float(i), -float(i)] for i in range(5)]
    assert per_rank_batch_size(8) == 4
    # Epoch loss sums: rank 0 ran 3 iterations summing 1.5, rank 1 ran 3 summing 4.5.
    assert sum_over_ranks([3.0, 1.5 + 3.0 * rank()]) == [6.0, 6.0]
    with pytest.raises(ConfigError, match="multiple of the 2"):
        per_rank_batch_size(5)


@pytest.mark.slow
def test_gather_and_batch_split_on_two_processes(monkeypatch) -> None:
    import ignite.distributed as idist

    # Ignite's launcher gives each spawned rank its own GPU whenever CUDA exists, even for
    # gloo: on a one-GPU host rank 1 would fail before the collectives are reached.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_collectives)


def test_cpu_ranks_on_a_gpu_host_claim_no_gpu(monkeypatch) -> None:
    import socket

    import ignite.distributed as idist

    from fewlabel.utils import distributed

    def claim(device) -> None:
        raise AssertionError(f"a CPU rank claimed GPU {device}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    # A launcher-started rank (one process stands in for several) on a host that has CUDA.
    monkeypatch.setattr(distributed, "launched_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", claim)
    try:
        with distributed.distributed_session("cpu"):
            assert idist.backend() == "gloo" and idist.get_local_rank() == 0
        assert idist.model_name() == "serial" and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        idist.sync()


def test_single_process_helpers_are_no_ops() -> None:
    from torch import nn

    from fewlabel.utils.distributed import (
        gather_sharded,
        is_main_process,
        per_rank_batch_size,
        rank_zero_only,
        sum_over_ranks,
        unwrap_model,
        world_size,
        wrap_model,
    )

    assert world_size() == 1 and is_main_process()
    assert per_rank_batch_size(5) == 5
    rows = torch.arange(6.0).view(3, 2)
    assert gather_sharded(rows, 3) is rows
    net = nn.Linear(2, 2)
    assert wrap_model(net, torch.device("cpu"), sync_bn=True) is net
    assert unwrap_model(nn.DataParallel(net)) is net
    assert rank_zero_only(lambda: "written")() == "written"
    assert sum_over_ranks([3.0, 1.5]) == [3.0, 1.5]


def test_collective_timeout_is_long_and_can_be_set(monkeypatch) -> None:
    from fewlabel.errors import ConfigError
    from fewlabel.utils.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 120 * 60  # not NCCL's 10 minutes
    monkeypatch.setenv(TIMEOUT_ENV, "45")
    assert collective_timeout().total_seconds() == 45 * 60
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            collective_timeout()
