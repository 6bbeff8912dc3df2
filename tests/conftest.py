"""Shared fixtures: real-data location, thread limits for a small CI machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Small CI machines have two cores; oversubscribing them makes every test slower.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(
    os.environ.get("FEWLABEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture
def shared_data() -> Path:
    """The read-only real datasets; the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def restore_determinism_flag() -> Iterator[None]:
    """run.deterministic switches torch's global flag on; later tests should not inherit it."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
