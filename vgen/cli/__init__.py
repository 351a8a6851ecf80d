"""The ``vgen`` command line: one entry point, one module per subcommand.

Each module in :data:`SUBCOMMAND_MODULES` defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace). Bad input raises :class:`vgen.errors.UserError`, which ends as one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from vgen.errors import UserError

# Subcommand modules under vgen.cli, in the order `vgen --help` lists them.
SUBCOMMAND_MODULES = [
    "data",
    "eval",
    "sample",
    "train",
    "generate",
    "convert",
    "bench",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse parser whose errors are one line on stderr (``vgen <cmd>: error: ...``) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@contextlib.contextmanager
def one_line_warnings(prefix: str):
    """Show each warning as one line, ``<prefix>: warning: <message>``, on stderr (not Python's two-line format with
    the source line)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"{prefix}: warning: {message}",
                                                                      file=sys.stderr)
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="vgen",
        description="vgen: visual autoregressive generation (VAR next-scale generators, a shared sampling layer, "
        "KV caches on Triton kernels, FID and GenEval scoring).",
    )
    from vgen import __version__

    parser.add_argument("--version", action="version", version=f"vgen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"vgen.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        if args.command is None:
            parser.print_help()
            return 0
        # A command group (e.g. `vgen data`) called without its subcommand.
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 0
    try:
        with one_line_warnings(f"vgen {args.command}"):
            result = args.func(args)
    except UserError as err:
        print(f"vgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a run that stopped cleanly says how to continue
        print(f"vgen {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
