"""``largo dev localnode`` (run a node agent) and ``largo dev logs`` (read a localnode pod's logs)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from largo.dev.localnode import agent as agent_module


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = commands.add_parser("localnode", help="run a development node whose pods are local processes")
    node.add_argument("--name", required=True, help="the Node's name")
    node.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    node.add_argument("--bridge", default="largo0", help="bridge shared by the nodes of one cluster")
    node.add_argument("--gateway", default="10.88.0.1/16", help="the bridge's address and the pod network")
    node.add_argument("--pod-cidr", default="10.88.1.0/24", help="addresses this node gives its pods")
    node.add_argument("--state-dir", type=Path, required=True, help="pods' volumes; removed on stop")
    node.add_argument("--logs-dir", type=Path, required=True, help="container logs")
    node.add_argument("--claims-dir", type=Path, required=True, help="PersistentVolumeClaim directories")
    node.add_argument("--cpu", default=str(os.cpu_count() or 1))
    node.add_argument("--memory", default="16Gi")
    node.add_argument("--gpus", type=int, default=None, help="nvidia.com/gpu (default: nvidia-smi's count)")
    node.add_argument("--pods", type=int, default=32)
    node.add_argument("--label", action="append", default=[], help="KEY=VALUE node label (repeatable)")
    node.add_argument("--serving-cert", type=Path, default=None, help="TLS certificate of the log endpoint")
    node.add_argument("--serving-key", type=Path, default=None)
    node.add_argument(
        "--client-ca", type=Path, default=None, help="CA of the API server's client certificate"
    )
    node.add_argument("--cluster-dns", default=None, help="the DNS server of ClusterFirst pods")
    node.add_argument("--cluster-domain", default="cluster.local")
    node.add_argument(
        "--extra-path", action="append", default=[], help="a directory to put in pods' PATH (repeatable)"
    )
    node.set_defaults(handler=run_node)


def run_node(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("localnode needs root: it creates network namespaces and mounts", file=sys.stderr)
        return 2
    if args.kubeconfig is None:
        print("localnode needs --kubeconfig or $KUBECONFIG", file=sys.stderr)
        return 2
    gpus = agent_module.detect_gpus() if args.gpus is None else args.gpus
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": str(args.pods)}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    labels = dict(item.split("=", 1) for item in args.label)
    node = agent_module.NodeConfig(
        name=args.name,
        kubeconfig=args.kubeconfig,
        state_dir=args.state_dir,
        logs_dir=args.logs_dir,
        claims_dir=args.claims_dir,
        net=agent_module.parse_network(args.bridge, args.gateway, args.pod_cidr),
        capacity=capacity,
        labels=labels,
        serving_cert=args.serving_cert,
        serving_key=args.serving_key,
        client_ca=args.client_ca,
        extra_path=tuple(args.extra_path),
        cluster_dns=args.cluster_dns,
        cluster_domain=args.cluster_domain,
    )
    agent = agent_module.Agent(node)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: agent.stop())
    runner = threading.Thread(target=agent.run, name="localnode")
    runner.start()
    while runner.is_alive():
        runner.join(0.5)
    return 0
