"""The four mapped folders install under `vgen.` and never shadow the widely used `tokenizers`/`kernels` packages."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

MAPPED = {"tokenizers": "vgen.tokenizers", "samplers": "vgen.samplers", "kernels": "vgen.kernels", "eval": "vgen.eval"}


@pytest.mark.parametrize("folder,module", sorted(MAPPED.items()))
def test_mapped_folder_imports_under_vgen(folder, module):
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == (REPO_ROOT / folder / "__init__.py").resolve()


def test_top_level_names_do_not_resolve_to_this_project(tmp_path):
    # Run outside the repository so the current directory is not on sys.path, as for any user of the package.
    code = (
        "import importlib.util, json\n"
        "out = {}\n"
        "for name in ['tokenizers', 'kernels', 'samplers', 'eval']:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = spec.origin if spec is not None else None\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    import json

    origins = json.loads(result.stdout)
    for name, origin in origins.items():
        if origin is not None:
            assert not Path(origin).resolve().is_relative_to(REPO_ROOT), f"`import {name}` resolves into vgen: {origin}"


def test_cli_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "vgen", "--help"], capture_output=True, text=True, check=True)
    assert "data" in result.stdout


def test_unknown_subcommand_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "vgen", "no-such-command"], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_python_m_vgen_in_the_checkout_does_not_shadow_top_level_packages():
    # `python -m vgen` from the repository root puts the root on sys.path; vgen drops it before importing anything,
    # so `import tokenizers` (Hugging Face, imported by transformers) cannot pick up this project's folder.
    code = (
        "import importlib.util, runpy, sys\n"
        "sys.argv = ['vgen', '--help']\n"
        "try:\n"
        "    runpy.run_module('vgen', run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "spec = importlib.util.find_spec('tokenizers')\n"
        "print('origin:', spec.origin if spec is not None else '')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    origin = result.stdout.rsplit("origin:", 1)[1].strip()
    assert not origin or not Path(origin).resolve().is_relative_to(REPO_ROOT), origin
