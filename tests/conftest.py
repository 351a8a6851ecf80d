"""Shared test fixtures. Tests run on CPU, offline, with tiny models built in code."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Triton kernels run on CPU through the Triton interpreter. Triton reads TRITON_INTERPRET when it is imported (its
# standard library, e.g. tl.sum, is jit-wrapped at import), so it is set here, before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    """The shared reference folder: ``$VGEN_REFERENCE_DIR``, else the nearest ``shared/reference`` beside the
    checkout or beside one of its parent folders (a git worktree may sit one level deeper than the main checkout)."""
    if os.environ.get("VGEN_REFERENCE_DIR"):
        return Path(os.environ["VGEN_REFERENCE_DIR"])
    for base in REPO_ROOT.parents:
        if (base / "shared" / "reference").is_dir():
            return base / "shared" / "reference"
    return REPO_ROOT.parent / "shared" / "reference"


REFERENCE_DIR = _reference_dir()
PARITY_DIR = REFERENCE_DIR / "parity"
LAYOUT_DIR = REFERENCE_DIR / "checkpoint-layouts"
GENEVAL_DIR = REFERENCE_DIR / "geneval"

torch.set_num_threads(min(2, torch.get_num_threads()))


def _one_intra_op_thread():
    """One intra-op thread while the fixture lives: tiny models gain nothing from more, and on a machine shared
    with other jobs they lose several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: one thread per test (``pytestmark = pytest.mark.usefixtures("one_thread")`` for a whole file, or as an argument)
one_thread = pytest.fixture(_one_intra_op_thread, name="one_thread")
#: one thread for a whole test file, its module-scoped fixtures included
one_thread_per_module = pytest.fixture(_one_intra_op_thread, scope="module", name="one_thread_per_module")


@pytest.fixture
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY_DIR} (the shared reference folder beside the repo)")
    return PARITY_DIR


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run vgen's Triton kernels on CPU through the interpreter; skips when triton is missing or was imported
    before ``TRITON_INTERPRET=1`` was set."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'vgen[kernels]')")
    from vgen.kernels._dispatch import triton_imported_for_interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not triton_imported_for_interpreter():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")


@pytest.fixture
def generator_seeds(monkeypatch) -> list[list[int]]:
    """Every ``VARPipeline`` call made during the test records the seeds of the generators it was given, one list
    per call: how tests check that each image keeps its own random stream whatever the batch."""
    from vgen.pipelines.var import VARPipeline

    calls: list[list[int]] = []
    real_call = VARPipeline.__call__

    def recording_call(self, *args, **kwargs):
        calls.append([g.initial_seed() for g in kwargs["generator"]])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", recording_call)
    return calls
