"""``python -m vgen``: the CLI.

Run inside a source checkout, ``python -m`` puts the checkout root first on ``sys.path``, where the folders that
install as ``vgen.tokenizers``, ``vgen.kernels``, ``vgen.samplers`` and ``vgen.eval`` would shadow the packages of
those top-level names (Hugging Face ``tokenizers``, which ``transformers`` imports when diffusers loads it). The
checkout root is dropped from ``sys.path`` before anything else is imported; the installed ``vgen`` does not need it.
"""

import sys
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def without_checkout_root(paths: list[str], checkout_root: Path = CHECKOUT_ROOT) -> list[str]:
    """``paths`` (``sys.path``) without entries that point at a source checkout's root ("" is the working dir)."""
    if not (checkout_root / "tokenizers" / "__init__.py").is_file():
        return list(paths)
    return [p for p in paths if Path(p or ".").resolve() != checkout_root]


if __name__ == "__main__":
    sys.path[:] = without_checkout_root(sys.path)

    from vgen.cli import main

    sys.exit(main())
