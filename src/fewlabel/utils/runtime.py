"""Device selection, thread counts, mixed precision, seeding and determinism."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn


def select_device(name: str = "auto") -> torch.device:
    """Pick the device to train on.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        The torch device.

    Raises:
        ValueError: if the name is not one of those, or CUDA is requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name!r}: fewlabel runs on auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but this machine has no Apple GPU (MPS)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def config_device(name: str) -> torch.device:
    """:func:`select_device` for a config's ``run.device``.

    Args:
        name: the ``run.device`` value.

    Returns:
        The torch device.

    Raises:
        ConfigError: naming ``run.device`` when the machine lacks the device.
    """
    from fewlabel.errors import ConfigError

    try:
        return select_device(name)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"run.device={name!r}: {err}") from err


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` torch CPU threads inside the block (0: torch's default), then restore.

    The thread count is process-wide; a library call leaves it as it found it.

    Args:
        count: ``run.num_threads``.

    Yields:
        Nothing.
    """
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count > 0:
            torch.set_num_threads(previous)


def autocast(device: torch.device, enabled: bool, cpu_bf16: bool = False) -> AbstractContextManager:
    """Mixed-precision context: float16 autocast on CUDA, optionally bfloat16 on CPU.

    Args:
        device: the compute device.
        enabled: ``train.amp`` (CUDA only).
        cpu_bf16: ``train.cpu_amp``: bfloat16 autocast when ``device`` is the CPU.

    Returns:
        A context manager.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class CPUAutocast(nn.Module):
    """Run a network's forward pass under bfloat16 autocast on the CPU; return float32.

    MONAI's ``SupervisedTrainer`` autocasts on CUDA only, so CPU mixed precision wraps the
    network instead. Weights, gradients and optimizer state stay float32 (bfloat16 has
    float32's exponent range, so no gradient scaling is needed); convolutions and matrix
    products run in bfloat16, which CPUs with AMX or AVX-512 BF16 units execute about twice as
    fast. The output is cast back to float32 so that losses sum over many voxels in full
    precision. Save the wrapped ``net``, not this wrapper: its state dict prefixes ``net.``.

    Args:
        net: the network (or its ``DistributedDataParallel`` wrapper).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped network's forward under bfloat16 autocast, tensors returned as float32."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.net(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) else out


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch, optionally forcing deterministic kernels.

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic algorithms (slower on GPU; on CPU the
            results are then bitwise reproducible for a fixed thread count).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        # Several experiments in one process (a script's loop): an earlier deterministic run
        # must not slow the next one down.
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def rng_state() -> dict:
    """Capture the Python, NumPy and torch RNG states in a ``weights_only``-loadable form.

    Returns:
        A dict of plain containers and tensors (no pickled objects).
    """
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states captured by :func:`rng_state`.

    Args:
        state: the dict returned by :func:`rng_state`.
    """
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on a machine with fewer GPUs restores the generators it still has.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _to_plain(obj):
    if isinstance(obj, tuple):
        return [_to_plain(o) for o in obj]
    return obj


def _to_tuple(obj):
    if isinstance(obj, list):
        return tuple(_to_tuple(o) for o in obj)
    return obj
