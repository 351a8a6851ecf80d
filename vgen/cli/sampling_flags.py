"""Sampling flags built from the pipelines' declarations (:mod:`vgen.pipelines.registry`), shared by ``vgen
generate``, ``vgen sample`` and ``vgen eval geneval``.

Every option any family declares becomes one flag (``guidance_scale`` -> ``--guidance-scale``) whose help names the
families that have it. A flag left out takes the loaded model's saved setting; a flag the loaded family does not
declare is refused in one line that lists the flags it does take.
"""

from __future__ import annotations

import argparse

from vgen.cli.checks import argparse_type
from vgen.errors import UserError
from vgen.pipelines.registry import PIPELINES, all_sampling_options


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per declared sampling option (default None = the model's saved setting)."""
    group = parser.add_argument_group(
        "sampling options", "each model family has its own (in brackets); a flag left out takes the model's saved "
        "setting (model_index.json)")
    for name, (option, families) in all_sampling_options().items():
        help_text = f"{option.help} [{', '.join(families)}]".replace("%", "%%")
        if option.flag:
            group.add_argument(option.cli_flag, dest=name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(option.cli_flag, dest=name, type=argparse_type(option.parse), default=None,
                               metavar=option.metavar, help=help_text)


def given_sampling_flags(args: argparse.Namespace) -> dict:
    """The sampling flags the user gave (name -> value)."""
    return {name: getattr(args, name) for name in all_sampling_options() if getattr(args, name, None) is not None}


def sampling_from_flags(args: argparse.Namespace, pipe) -> tuple[dict, dict]:
    """``(saved, extra)``: every saved option of ``pipe``'s family resolved (given flag, else the model's setting),
    and the given call-only options (e.g. ``more_smooth``). A flag the family does not declare is a UserError."""
    if getattr(pipe, "produces", "images") != "images":  # e.g. a VideoPipeline: vgen generate-video serves it
        raise UserError(f"this folder holds a {type(pipe).__name__}, which makes {pipe.produces}, not images; use "
                        f"'vgen {pipe.produces_command}' for it")
    given = given_sampling_flags(args)
    declared = {option.name: option for option in pipe.sampling_options}
    foreign = [name for name in given if name not in declared]
    if foreign:
        family = next((e.family for n, e in PIPELINES.items() if n == type(pipe).__name__), type(pipe).__name__)
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        own = ", ".join(option.cli_flag for option in declared.values())
        raise UserError(f"{flags}: not a sampling option of {family} models; this model takes {own}")
    for name, value in given.items():  # a flag several families share is parsed by the loosest: check this one's rule
        try:
            given[name] = declared[name].parse(value)
        except ValueError as err:
            raise UserError(f"{declared[name].cli_flag}: {err}") from None
    saved = pipe.resolve_sampling(**{name: value for name, value in given.items() if declared[name].saved})
    extra = {name: value for name, value in given.items() if not declared[name].saved}
    return saved, extra
