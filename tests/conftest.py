"""Shared fixtures: real-data location, thread limits for a small CI machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Small CI machines have two cores; oversubscribing them makes every test slower.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("FEWLABEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The read-only real datasets; the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
