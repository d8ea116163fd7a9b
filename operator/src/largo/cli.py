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
    if arguments[:1] not in (["operator"], ["top"]):
        # The development tooling (local cluster, PKI, localnode) and its dependencies stay out of the
        # operator's process and image: `largo operator` and `largo top` never import largo.dev, which
        # needs the `dev` extra (cryptography, for one).
        try:
            from largo.dev import cli as dev_cli
        except ImportError as error:
            if arguments[:1] and not arguments[0].startswith("-"):
                print(f"largo {arguments[0]}: needs largo's dev extra (pip install 'largo[dev]'): {error}")
                return 2
        else:
            dev_cli.add_parser(subparsers)
    args = parser.parse_args(arguments)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
