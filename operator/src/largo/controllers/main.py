"""``largo operator``: runs the controllers under kopf."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.parse


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
        "--leader-elect",
        action="store_true",
        help="one of several replicas: only the holder of a coordination.k8s.io Lease acts",
    )
    operator.add_argument(
        "--leader-election-namespace",
        default=None,
        help="namespace of the Lease (default: the operator's own)",
    )
    operator.add_argument("--leader-election-id", default="largo-operator", help="name of the Lease")
    operator.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one JSON object per line"
    )
    operator.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (default: off)"
    )
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=run)


def log_handler(log_format: str) -> logging.Handler:
    """Text for people, or one JSON object per line (time, level, logger, message and any extra
    fields such as ``object`` and ``reason``) for log pipelines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def liveness_endpoint(url: str | None, pod_ip: str | None) -> str | None:
    """The health checks' URL, on the address family of the pod's IP when ``url`` names every
    address: kopf serves them on one socket, which asyncio makes IPv6-only for ``::``, and the kubelet
    probes the pod's (primary) IP, an IPv6 one in an IPv6 cluster, where ``0.0.0.0`` was never reached."""
    if url is None or not pod_ip or ":" not in pod_ip:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.hostname != "0.0.0.0":
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"[::]:{parts.port}" if parts.port else "[::]"))


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from largo.controllers.leader import default_namespace
    from largo.controllers.settings import OperatorSettings, describe

    # The command line wins over the environment for what both can say.
    overrides: dict[str, object] = {}
    if args.metrics_port:
        overrides["metrics_port"] = args.metrics_port
    if args.leader_elect:
        overrides["leader_election"] = (
            f"{args.leader_election_namespace or default_namespace()}/{args.leader_election_id}"
        )
    try:
        settings = OperatorSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        for line in describe(error):
            print(f"largo operator: {line}", file=sys.stderr)
        return 2

    import kopf

    import largo.controllers.handlers  # noqa: F401  (registers the handlers)

    handler = log_handler(args.log_format)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if not args.verbose:
        # kopf logs every handler call at INFO; largo's own lines and kopf's warnings are what matter.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        # Several replicas coordinate through largo's own Lease election (controllers/leader.py), not
        # kopf peering, which pauses handlers but fences neither the scheduler nor the writes.
        standalone=True,
        liveness_endpoint=liveness_endpoint(args.liveness, os.environ.get("POD_IP")),
        # The start-up handler, which kopf calls without our arguments, finds them here.
        memo=kopf.Memo(settings=settings),
    )
    return 0
