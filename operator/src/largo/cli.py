"""The ``largo`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from largo import top
from largo.controllers import main as operator_cli


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="largo", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    operator_cli.add_parser(subparsers)
    top.add_parser(subparsers)
    if arguments[:1] != ["operator"]:
        # The development tooling (local cluster, PKI, localnode) and its dependencies stay out of the
        # operator's process and image: `largo operator` never imports largo.dev.
        from largo.dev import cli as dev_cli

        dev_cli.add_parser(subparsers)
    args = parser.parse_args(arguments)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
