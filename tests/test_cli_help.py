"""`vgen --help` and every command's help: fast (no torch, no diffusers), plain text, defaults shown."""

import argparse
import re
import subprocess
import sys

from vgen.cli import build_parser, plain_text


def all_parsers():
    stack = [("vgen", build_parser())]
    while stack:
        name, parser = stack.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += [(f"{name} {sub}", p) for sub, p in action.choices.items()]


def test_help_builds_without_torch_or_diffusers():
    code = ("import sys\nfrom vgen.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'cleanfid')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_help_texts_are_plain_and_show_defaults():
    for name, parser in all_parsers():
        text = parser.format_help()
        assert "%%" not in text and "``" not in text and not re.search(r":(class|func|mod|meth):", text), name
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.nargs == 0 or default is None or default is False
                    or default == argparse.SUPPRESS or default in ([], ())):
                continue
            help_text = parser._get_formatter()._expand_help(action)
            assert "default" in help_text, f"{name} {action.option_strings[0]}: no default in {help_text!r}"


def test_plain_text_drops_docstring_markup():
    assert plain_text("``vgen generate``: see :class:`~vgen.x.Y` and `z`") == "vgen generate: see vgen.x.Y and z"
