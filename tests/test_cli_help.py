"""Every verb of `latentattn` describes itself and every option it takes.

Oracle: the parser itself, walked verb by verb; an option without help text fails by name.
"""

from __future__ import annotations

import argparse

from latentattn.cli import build_parser


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_verb_has_a_description_and_every_option_help():
    parser = build_parser()
    missing = []
    for name, verb in {"latentattn": parser, **_verbs(parser)}.items():
        if not verb.description:
            missing.append(f"{name}: description")
        for action in verb._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
