"""The ``largo`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from largo.controllers import main as operator_cli
from largo.dev import cli as dev_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="largo", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    dev_cli.add_parser(subparsers)
    operator_cli.add_parser(subparsers)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
