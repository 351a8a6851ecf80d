"""Shared test fixtures. Tests run on CPU, offline, with tiny models built in code."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO_ROOT.parent / "shared" / "reference" / "parity"
LAYOUT_DIR = REPO_ROOT.parent / "shared" / "reference" / "checkpoint-layouts"
GENEVAL_DIR = REPO_ROOT.parent / "shared" / "reference" / "geneval"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY_DIR} (the shared reference folder beside the repo)")
    return PARITY_DIR
