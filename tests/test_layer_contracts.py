"""The layer rules of the architecture, checked on the import graph of the source tree.

Every ``import`` / ``from ... import`` statement in a module counts, including those inside functions (a lazy
import is still a dependency). Relative imports are resolved against the module's package.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: source folder -> package name (pyproject's package-dir)
PACKAGE_DIRS = {"vgen": "vgen", "tokenizers": "vgen.tokenizers", "samplers": "vgen.samplers",
                "kernels": "vgen.kernels", "eval": "vgen.eval"}

#: (layer, packages it must never import); "vgen" alone stands for every vgen package but the layer itself
FORBIDDEN = {
    "vgen.kernels": ("vgen",),
    "vgen.samplers": ("vgen.models", "vgen.pipelines", "vgen.train", "vgen.cli", "vgen.eval"),
    "vgen.tokenizers": ("vgen.models", "vgen.pipelines", "vgen.train", "vgen.cli", "vgen.eval"),
    "vgen.models": ("vgen.pipelines", "vgen.train", "vgen.cli", "vgen.eval"),
    "vgen.data": ("vgen.models",),
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the mapped source folders under ``root``."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        base = root / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(module: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` (module ``module``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def violations(root: Path) -> list[str]:
    found = []
    for module, path in sorted(module_files(root).items()):
        for layer, forbidden in FORBIDDEN.items():
            if module != layer and not module.startswith(layer + "."):
                continue
            for name in imported_modules(module, path):
                if name == layer or name.startswith(layer + "."):
                    continue
                for banned in forbidden:
                    if name == banned or name.startswith(banned + "."):
                        found.append(f"{module} ({path.relative_to(root)}) imports {name}: {layer} must not use "
                                     f"{banned}")
    return found


def test_layer_contracts_hold():
    assert violations(ROOT) == []


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """Plant one forbidden import per rule (absolute, relative and lazy) in a copy-shaped tree."""
    files = {
        "kernels/__init__.py": "", "kernels/bad.py": "def f():\n    from vgen.errors import UserError\n",
        "samplers/__init__.py": "", "samplers/bad.py": "import vgen.models.var\n",
        "tokenizers/__init__.py": "", "tokenizers/bad.py": "from vgen.eval import fid\n",
        "vgen/__init__.py": "", "vgen/models/__init__.py": "", "vgen/models/bad.py": "from ..pipelines import x\n",
        "vgen/data/__init__.py": "", "vgen/data/bad.py": "from vgen.models.var import VAR\n",
        "vgen/models/good.py": "from vgen.kv_cache import FullKVCache\nfrom .layers import attention\n",
        "eval/__init__.py": "from vgen.models import var\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    offenders = {v.split()[0] for v in violations(tmp_path)}
    assert offenders == {"vgen.kernels.bad", "vgen.samplers.bad", "vgen.tokenizers.bad", "vgen.models.bad",
                         "vgen.data.bad"}


@pytest.mark.parametrize("module", ["vgen.kernels", "vgen.samplers", "vgen.tokenizers", "vgen.models"])
def test_each_layer_has_modules(module):
    """The rules would pass vacuously if a folder moved: every layer still has source files."""
    assert any(name == module or name.startswith(module + ".") for name in module_files(ROOT))
