"""Multi-process (data-parallel) training helpers on top of ``ignite.distributed``.

``fewlabel train`` runs unchanged in one process, and data-parallel when started by
``torchrun --nproc_per_node N`` (one process per GPU, or N CPU processes with gloo):

- :func:`distributed_session` sets up the process group from torchrun's environment
  (``nccl`` on CUDA, ``gloo`` on the CPU) and tears it down afterwards;
- every rank trains on its own shard of each global batch (:func:`per_rank_batch_size`;
  :class:`fewlabel.data.sampling.ResumableSampler` with ``num_replicas``/``rank``), the
  model is wrapped in ``DistributedDataParallel`` by :func:`wrap_model` (gradients are
  averaged, so one step equals a single-process step on the global batch), and the
  unwrapped module (:func:`unwrap_model`) is what checkpoints hold;
- only rank 0 writes files (:func:`is_main_process`, :func:`rank_zero_only`).

Everything here degrades to a no-op in a single process, so the library code calls these
helpers unconditionally. Ignite's ``idist`` supplies the process-group state; these helpers
add the pieces it lacks: a launcher-aware session, batch-size splitting that refuses
uneven shards, and re-assembly of rank-strided shards in their global order.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ignite.distributed as idist
import torch
from torch import nn

from fewlabel.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "backend_for",
    "barrier",
    "broadcast_str",
    "collective_timeout",
    "distributed_session",
    "gather_sharded",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
    "per_rank_batch_size",
    "rank",
    "rank_device",
    "rank_zero_only",
    "sum_over_ranks",
    "unwrap_model",
    "world_size",
    "wrap_model",
]

F = TypeVar("F", bound=Callable[..., Any])

# Minutes a collective waits for the slowest rank. Segmentation validates on rank 0 alone
# while the others wait at the next all-reduce; NCCL's own default of 10 minutes would abort
# a run whose validation takes longer.
TIMEOUT_ENV = "FEWLABEL_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 120.0


def collective_timeout() -> datetime.timedelta:
    """How long collective operations wait (``FEWLABEL_DIST_TIMEOUT_MINUTES``, default 120).

    Returns:
        The timeout given to the process group.

    Raises:
        ConfigError: if the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0 or minutes == float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: give a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def world_size() -> int:
    """Number of training processes (1 outside a distributed run).

    Returns:
        The world size.
    """
    return idist.get_world_size()


def rank() -> int:
    """This process's global rank (0 outside a distributed run).

    Returns:
        The rank.
    """
    return idist.get_rank()


def is_distributed() -> bool:
    """Whether more than one process takes part in training.

    Returns:
        ``True`` inside a multi-process run.
    """
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this process is rank 0, the only one that writes files.

    Returns:
        ``True`` for rank 0 (and for a single process).
    """
    return rank() == 0


def rank_zero_only(fn: F) -> F:
    """Run the decorated function on rank 0 only; other ranks get ``None`` back at once.

    Used for anything that writes files (checkpoints, history, reports) so that several
    processes never write the same path.

    Args:
        fn: the function.

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_main_process():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        idist.barrier()


def launched_distributed() -> bool:
    """Whether a launcher (``torchrun``) started this process as one of several.

    Returns:
        ``True`` when the ``WORLD_SIZE`` environment variable says more than one process.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for a compute device.

    Args:
        device: the configured device.

    Returns:
        ``nccl`` for CUDA, ``gloo`` otherwise.
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def distributed_session(device: torch.device | str) -> Iterator[None]:
    """Initialise the process group when launched by ``torchrun``; tear it down on exit.

    In a single process, or when a process group already exists (e.g. started by
    ``idist.Parallel``), nothing is set up or torn down.

    Args:
        device: the configured device; chooses the backend (see :func:`backend_for`).

    Yields:
        Nothing; inside the block :func:`world_size` and :func:`rank` describe the run.

    Raises:
        ConfigError: if CUDA (``nccl``) is requested but not available.
    """
    if not launched_distributed() or idist.model_name() != "serial":
        yield
        return
    backend = backend_for(device)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("run.device asks for CUDA under torchrun, but CUDA is not available")
    timeout = collective_timeout()
    if backend == "gloo":
        # Ignite's initialize pins every rank to cuda:<local rank> whenever CUDA exists, even
        # for gloo: CPU ranks on a host with fewer GPUs than processes then fail, and on
        # others each rank opens a GPU context it never uses. Ignite adopts a group made here.
        torch.distributed.init_process_group("gloo", timeout=timeout)
        idist.sync()
    else:
        idist.initialize(backend, timeout=timeout)
    log.info(
        "distributed training: rank %d of %d (%s, collectives wait up to %.0f min)",
        rank(),
        world_size(),
        backend,
        timeout.total_seconds() / 60,
    )
    try:
        yield
    finally:
        idist.finalize()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: its own GPU (``cuda:<local rank>``) when distributed.

    Args:
        device: the configured device.

    Returns:
        ``device`` unchanged in a single process or on the CPU.
    """
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", idist.get_local_rank())
    return device


def per_rank_batch_size(global_batch: int, setting: str = "train.batch_size") -> int:
    """Split a configured (global) batch size evenly across the ranks.

    The configured batch size stays the global one, so a run on N processes optimises the
    same objective (and has as many iterations per epoch) as a run on one.

    Args:
        global_batch: the configured batch size.
        setting: the config key, for the error message.

    Returns:
        ``global_batch // world_size()``.

    Raises:
        ConfigError: if the batch size is not a multiple of the number of processes.
    """
    n = world_size()
    if global_batch % n:
        raise ConfigError(
            f"{setting}={global_batch} is the global batch and must be a multiple of the {n} "
            f"training processes; choose {max(n, global_batch - global_batch % n)} or {global_batch + n - global_batch % n}"
        )
    return global_batch // n


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a model for data-parallel training (``idist.auto_model``); the model itself when alone.

    Args:
        model: the module, already on ``device``.
        device: this rank's device (:func:`rank_device`).
        sync_bn: convert BatchNorm layers to ``SyncBatchNorm`` so that batch statistics span
            the global batch; torch implements it on CUDA only, so it is ignored on the CPU.
        **ddp_kwargs: more ``DistributedDataParallel`` arguments (e.g. ``find_unused_parameters``).

    Returns:
        A ``DistributedDataParallel`` module sharing ``model``'s parameters, or ``model``.
    """
    if not is_distributed():
        # idist.auto_model would fall back to DataParallel on a multi-GPU machine, which
        # changes batch statistics behind the user's back; one process means one device.
        return model
    if device.type == "cuda":
        return idist.auto_model(model, sync_bn=sync_bn, **ddp_kwargs)
    if sync_bn:
        log.warning("SyncBatchNorm needs CUDA: BatchNorm statistics stay per process on the CPU")
    # auto_model pins DDP to a GPU whenever CUDA exists; CPU training on a GPU host must not be.
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel``/``DataParallel`` wrapper.

    Checkpoints save the unwrapped module's ``state_dict`` (no ``module.`` prefixes), so
    they load into any number of processes.

    Args:
        model: a module, wrapped or not.

    Returns:
        The inner module.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def broadcast_str(value: str | None, src: int = 0) -> str:
    """Send a string from rank ``src`` to every rank.

    Args:
        value: the string on ``src`` (ignored elsewhere).
        src: the sending rank.

    Returns:
        ``src``'s string on every rank (``value`` itself in a single process).
    """
    if not is_distributed():
        return "" if value is None else value
    return str(idist.broadcast(value, src=src, safe_mode=True))


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (one all-reduce, in float64).

    Every rank must call it with a list of the same length.

    Args:
        values: this rank's numbers.

    Returns:
        The sums; ``values`` unchanged in a single process.
    """
    if not is_distributed():
        return list(values)
    packed = idist.all_reduce(torch.tensor(values, dtype=torch.float64))
    return [float(v) for v in packed.cpu().tolist()]


def gather_sharded(local: torch.Tensor, total: int) -> torch.Tensor:
    """Re-assemble rows that were dealt round-robin to the ranks, in their global order.

    Rank ``r`` holds global rows ``r, r + W, r + 2W, ...`` (as produced by
    ``range(rank, total, world_size)``); ranks with one row fewer are padded before
    ``idist.all_gather`` (which needs equal shapes) and the padding is dropped after.

    Args:
        local: this rank's rows, ``(n_local, ...)``.
        total: the number of global rows.

    Returns:
        All ``total`` rows in global order, on every rank (``local`` in a single process).

    Raises:
        ValueError: if ``local`` does not have the number of rows its rank should hold.
    """
    n = world_size()
    if n == 1:
        return local
    per_rank = -(-total // n)
    expected = len(range(rank(), total, n))
    if local.shape[0] != expected:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows, expected {expected} of {total}")
    if expected < per_rank:
        pad = local.new_zeros((per_rank - expected, *local.shape[1:]))
        local = torch.cat([local, pad])
    source_device = local.device
    if idist.backend() == "nccl":
        local = local.to(idist.device())  # NCCL gathers GPU tensors only
    gathered = idist.all_gather(local.contiguous())
    assert isinstance(gathered, torch.Tensor)
    gathered = gathered.to(source_device)
    # (W * m, ...) in rank order -> (m, W, ...) interleaved -> global order.
    ordered = (
        gathered.reshape(n, per_rank, *local.shape[1:])
        .transpose(0, 1)
        .reshape(n * per_rank, *local.shape[1:])
    )
    return ordered[:total]
