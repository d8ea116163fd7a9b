"""``make demo``: a local cluster whose two nodes run pods as real processes (localnode), the operator,
and the demo TrainJob (the reference trainer, 2 nodes x 2 processes over gloo) from admission to success,
shown as ``kubectl get trainjobs`` would show it.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import yaml

from largo.dev.cluster import ClusterError, ClusterSpec, LocalCluster, LocalNodePool, wait_for
from largo.dev.operator_process import OperatorProcess
from largo.dev.tools import repo_root

EXAMPLE = Path("examples") / "trainjob-demo.yaml"
NAMESPACE = "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the job may take")
    args = parser.parse_args(argv)
    root = repo_root() or Path.cwd()
    example = root / EXAMPLE
    job = next(d for d in yaml.safe_load_all(example.read_text()) if d["kind"] == "TrainJob")
    name = job["metadata"]["name"]

    print("== starting the local cluster: etcd, kube-apiserver, controller-manager, scheduler, 2 localnodes")
    spec = ClusterSpec(node_pools=(), local_nodes=(LocalNodePool(count=2),))
    try:
        cluster = LocalCluster(spec)
        cluster.start()
    except ClusterError as error:
        print(f"the local cluster did not start: {error}", file=sys.stderr)
        return 1
    operator = OperatorProcess(cluster.kubeconfig, cluster.workdir / "operator.log")
    try:
        print(cluster.kubectl("get", "nodes", "-o", "wide").stdout)
        print("== installing largo's CRDs")
        cluster.install_crds(root / "crds")
        operator.start()
        print(f"== operator running (log: {operator.log})")
        print(f"== applying {EXAMPLE}")
        print(cluster.kubectl("apply", "-f", str(example)).stdout, end="")
        phase = _follow(cluster, name, args.timeout)
        print()
        print(cluster.kubectl("get", "pods", "-o", "wide", "-l", f"largo.dev/job-name={name}").stdout)
        print("== events")
        print(cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout)
        _next_steps(cluster, name, args.keep)
        if args.keep:
            print("== the cluster stays up; Ctrl-C stops it")
            threading.Event().wait()
        return 0 if phase == "Succeeded" else 1
    except KeyboardInterrupt:
        return 0
    except ClusterError as error:
        print(f"demo failed: {error}\n(operator log: {operator.log})", file=sys.stderr)
        return 1
    finally:
        operator.stop()
        cluster.stop()
        left = cluster.pod_network_leftovers()
        nothing = "no process, network namespace or mount"
        print(f"== stopped; left behind: {', '.join(left) if left else nothing}")


_ROW = "  {:<8} {:<11} {:<6} {:<9} {}"


def _follow(cluster: LocalCluster, name: str, timeout: float) -> str:
    """Prints the job's row whenever its phase, pods, restarts or progress change; returns the final phase."""
    seen: set[str] = set()
    fields = "{.status.phase}|{.status.nodes}|{.status.restarts}|{.status.progress.summary}"
    print(_ROW.format("NAME", "PHASE", "NODES", "RESTARTS", "PROGRESS"))
    final = {"phase": ""}

    def finished() -> bool:
        raw = cluster.kubectl("get", "trainjob", name, "-o", f"jsonpath={fields}", check=False).stdout
        phase, nodes, restarts, progress = [*raw.split("|"), "", "", ""][:4]
        row = _ROW.format(name, phase, nodes, restarts or "0", progress)
        if phase and row not in seen:
            seen.add(row)
            print(row, flush=True)
        final["phase"] = phase
        return phase in ("Succeeded", "Failed")

    wait_for(finished, timeout, f"TrainJob {name} to finish", cluster.assert_running)
    return final["phase"]


def _next_steps(cluster: LocalCluster, name: str, keep: bool) -> None:
    kubectl = cluster.tools.path("kubectl")
    claims = cluster.localnode_dir / "claims" / NAMESPACE / "demo-checkpoints"
    logs = cluster.localnode_dir / "logs"
    checkpoints = sorted(p.name for p in claims.glob("step-*.pt")) if claims.is_dir() else []
    print(f"== checkpoints on the claim's directory {claims}: {', '.join(checkpoints) or 'none'}")
    rank0 = sorted(logs.glob(f"{NAMESPACE}_{name}-node-0_*/trainer/*.log"))
    if rank0:
        print(f"== the last lines rank 0 wrote ({rank0[-1]})")
        for line in rank0[-1].read_text(errors="replace").splitlines()[-4:]:
            print("  " + line)
    print("== what next")
    if not keep:
        print("  `make demo ARGS=--keep` keeps the cluster up afterwards, to try:")
    print(f"  export KUBECONFIG={cluster.kubeconfig}")
    print(f"  {kubectl} get largo                 # every largo object")
    print(f"  kubectl describe trainjob {name}")
    print(f"  kubectl logs {name}-node-0                 # rank 0's output (files: {logs})")
    print(f"  kubectl delete trainjob {name}; kubectl delete pvc demo-checkpoints   # a clean slate, then:")
    print(f"  kubectl apply -f {EXAMPLE}; and while it runs: kubectl delete pod {name}-node-1")
    print("      # the whole gang restarts and resumes from its last checkpoint (RESTARTS 1)")
    print(f"  operator log: {cluster.workdir / 'operator.log'}")


if __name__ == "__main__":
    sys.exit(main())
