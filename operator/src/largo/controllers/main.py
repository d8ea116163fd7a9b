"""``largo operator``: runs the controllers under kopf."""

from __future__ import annotations

import argparse
import logging


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = subparsers.add_parser(
        "operator", help="run the largo operator (uses KUBECONFIG or in-cluster)"
    )
    operator.add_argument(
        "--namespace", action="append", default=[], help="watch only these namespaces (default: all)"
    )
    operator.add_argument(
        "--liveness", default=None, help="serve health checks, e.g. http://0.0.0.0:8080/healthz"
    )
    operator.add_argument(
        "--peering", default=None, help="kopf peering name for several replicas (default: standalone)"
    )
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    import largo.controllers.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call at INFO; largo's own lines and kopf's warnings are what matter.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0
