"""``make demo``: a local cluster with kwok GPU nodes, the operator, and a TrainJob from admission to
success, shown as ``kubectl get trainjobs`` would show it.

kwok nodes run no processes: the demo ends the job's pods itself (as a finished training run would),
through largo's kwok stage. Real training processes come with the localnode agent.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import yaml

from largo.dev.cluster import ClusterSpec, LocalCluster, NodePool, wait_for
from largo.dev.operator_process import OperatorProcess
from largo.dev.tools import repo_root

EXIT_ANNOTATION = "kwok.largo.dev/exit-code"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    args = parser.parse_args(argv)
    root = repo_root() or Path.cwd()
    example = root / "examples" / "trainjob-gpu.yaml"
    name = yaml.safe_load(example.read_text())["metadata"]["name"]

    print("== starting the local cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok")
    pool = NodePool(count=4, name_prefix="gpu-node", nodes_per_rack=2)
    with LocalCluster(ClusterSpec(node_pools=(pool,))) as cluster:
        print(cluster.kubectl("get", "nodes", "-L", "topology.largo.dev/rack").stdout)
        print("== installing largo's CRDs")
        for path in sorted((root / "crds").glob("*.yaml")):
            print(cluster.kubectl("apply", "--server-side", "-f", str(path)).stdout, end="")
        log = cluster.workdir / "operator.log"
        operator = OperatorProcess(cluster.kubeconfig, log)
        try:
            operator.start()
            print(f"== operator running (log: {log})")
            print(f"== applying {example.relative_to(root)}")
            print(cluster.kubectl("apply", "-f", str(example)).stdout, end="")
            _follow(cluster, name)
            print("\n== events")
            print(cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout)
            print("== what next")
            if not args.keep:
                print("  `make demo ARGS=--keep` keeps the cluster up afterwards, to try:")
            print(f"  export KUBECONFIG={cluster.kubeconfig}")
            print(f"  {cluster.tools.path('kubectl')} get largo            # every largo object")
            print(f"  kubectl describe trainjob {name}")
            print("  kubectl apply -f examples/          # more jobs; try two at once to see gang queueing")
            print(f"  operator log: {log}")
            if args.keep:
                print("== the cluster stays up; Ctrl-C stops it")
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            operator.stop()
    print("== stopped; nothing left running")
    return 0


def _follow(cluster: LocalCluster, name: str) -> None:
    """Prints the job's row whenever it changes, and ends the pods once they all run."""
    seen: set[str] = set()

    def show() -> str:
        return cluster.kubectl("get", "trainjob", name, "--no-headers").stdout.strip()

    def phase() -> str:
        return cluster.kubectl("get", "trainjob", name, "-o", "jsonpath={.status.phase}").stdout

    def changed_to(target: str) -> bool:
        row = show()
        state = " ".join(row.split()[:-1])  # without AGE, which changes every second
        if row and state not in seen:
            seen.add(state)
            print("  " + row)
        return phase() == target

    print("  " + cluster.kubectl("get", "trainjob", name).stdout.splitlines()[0])
    wait_for(lambda: changed_to("Running"), 120, "the job to run")
    print(cluster.kubectl("get", "pods", "-o", "wide", "-l", f"largo.dev/job-name={name}").stdout)
    print("== training 'finishes': the demo ends both pods with exit code 0")
    cluster.kubectl("annotate", "pods", "-l", f"largo.dev/job-name={name}", f"{EXIT_ANNOTATION}=0")
    wait_for(lambda: changed_to("Succeeded"), 120, "the job to succeed")


if __name__ == "__main__":
    sys.exit(main())
