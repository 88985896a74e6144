"""The `latentattn` command: parses arguments and calls the library's typed functions — nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentattn",
        description="Multi-head Latent Attention (MLA) toolkit: layers, caches, calculator.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_tour(verbs)
    return parser


def _add_tour(verbs: argparse._SubParsersAction) -> None:
    tour = verbs.add_parser("tour", help="a short tour: cache calculator plus an MLA prefill/decode")
    tour.set_defaults(run=_run_tour)


def _run_tour(args: argparse.Namespace) -> None:
    from latentattn.tour import run_tour

    run_tour()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"latentattn {args.verb}: error: {message}", file=sys.stderr)
        return 2
    return 0
