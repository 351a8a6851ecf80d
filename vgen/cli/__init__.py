"""The ``vgen`` command line: one entry point, one module per subcommand.

Each module in :data:`SUBCOMMAND_MODULES` defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace). Bad input raises :class:`vgen.errors.UserError`, which ends as one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
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
    "generate_video",
    "stream",
    "profile_heads",
    "convert",
    "bench",
]


#: OpenMP's wait policy for the CLI unless the user set one (see :func:`main`)
OMP_WAIT_POLICY = "PASSIVE"


def plain_text(text: str) -> str:
    """reST markup of a docstring (````code````, ``:class:`x```, ```x```) as plain text for ``--help``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), text)


class HelpFormatter(argparse.HelpFormatter):
    """Help without docstring markup, and with each option's default where its help does not say it already."""

    def _format_text(self, text: str) -> str:
        # descriptions are not %-formatted by argparse (unless they name %(prog)), so a "%%" would show as typed
        text = plain_text(text)
        return super()._format_text(text if "%(prog)" in text else text.replace("%%", "%"))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = plain_text(action.help or "")
        no_default = (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                      or action.default in ([], ()))
        if not action.option_strings or no_default or action.nargs == 0 or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse parser whose errors are one line on stderr (``vgen <cmd>: error: ...``) and exit code 2, with
    :class:`HelpFormatter` help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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
    # OpenMP threads that wait by spinning hold a core each while the other one works; on a shared or busy CPU
    # that made a 1.3 s generation take 5-15 s (README, "Startup and speed"). PASSIVE waits sleep instead; it
    # changes scheduling only, never results. Set before torch is imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
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
