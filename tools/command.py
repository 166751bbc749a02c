"""The tools' command lines: ``--debug`` and the tool's arguments, run with the runtime CLI's conventions."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fastvar_core.cli import run


def main(prog: str, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
         func: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``func`` on it: bad input is one error line and status 2, Ctrl-C status 130."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_arguments(parser)
    parser.set_defaults(func=func)
    return run(parser.parse_args(argv))
