"""The ``lipkern`` command line, one module per command.

- ``lipkern bench`` (lipkern.cli.bench): run the benchmark suite on whatever device is present and print the
  comparison table.
- ``lipkern certify`` (lipkern.cli.certify): certified accuracy of a saved model on a saved dataset, from a
  Lipschitz-margin certificate or randomized smoothing; a table, a JSON file and optionally a plot.
- ``lipkern train`` (lipkern.cli.train): train a reference network (lipkern.models.build_model) on a dataset
  (lipkern.data) with its paper's recipe, checkpoint and resume, then certify it (lipkern.train); DDP under
  torchrun.
"""

from __future__ import annotations

import argparse
import sys

from lipkern.cli import bench, certify, train

COMMANDS = {"bench": bench, "certify": certify, "train": train}


def build_parser() -> argparse.ArgumentParser:
    from lipkern import __version__

    parser = argparse.ArgumentParser(prog="lipkern")
    parser.add_argument("--version", action="version", version=f"lipkern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``lipkern`` arguments; for ``bench``, everything it does not know (and everything after ``--``)
    is kept, in order, in ``pytest_args``; ``certify`` and ``train`` reject unknown arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command != "bench" and (unknown or rest):
        parser.error(f"unrecognized arguments: {' '.join(unknown + rest)}")
    args.pytest_args = unknown + rest
    args.argv = argv
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return COMMANDS[args.command].run(args)
