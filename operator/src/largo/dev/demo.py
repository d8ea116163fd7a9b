"""``make demo``: a local cluster whose two nodes run pods as real processes (localnode), the operator,
and the demo TrainJob (the reference trainer, 2 nodes x 2 processes over gloo) from admission to success,
shown as ``kubectl get trainjobs`` would show it; then its checkpoint served by an InferenceService,
answering completions through the service's address, scaling up under a burst of requests and back
down after it, each decision with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path

import yaml

from largo.dev import load
from largo.dev.cluster import ClusterError, ClusterSpec, LocalCluster, LocalNodePool, wait_for
from largo.dev.operator_process import OperatorProcess
from largo.dev.tools import repo_root

EXAMPLE = Path("examples") / "trainjob-demo.yaml"
SERVING_EXAMPLE = Path("examples") / "inferenceservice-demo.yaml"
PROMPTS = ["def ", "import ", "class Model", "for i in range(", "return self.", "if __name__ == "]
NAMESPACE = "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the job may take")
    parser.add_argument("--no-serve", action="store_true", help="stop after training")
    parser.add_argument(
        "--burst-seconds", type=float, default=20, help="how long the burst of requests lasts"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the example's)")
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
        print(
            cluster.kubectl("apply", "-f", str(_with_steps(example, args.steps, cluster.workdir))).stdout,
            end="",
        )
        phase = _follow(cluster, name, args.timeout)
        print()
        print(cluster.kubectl("get", "pods", "-o", "wide", "-l", f"largo.dev/job-name={name}").stdout)
        print("== events")
        print(cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout)
        served = True
        if phase == "Succeeded" and not args.no_serve:
            served = _serve(cluster, root, args.burst_seconds)
        _next_steps(cluster, name, args.keep)
        if args.keep:
            print("== the cluster stays up; Ctrl-C stops it")
            threading.Event().wait()
        return 0 if phase == "Succeeded" and served else 1
    except KeyboardInterrupt:
        return 0
    except ClusterError as error:
        print(f"demo failed: {error}\n(operator log: {operator.log})", file=sys.stderr)
        return 1
    finally:
        operator.stop()
        cluster.stop()
        left = cluster.pod_network_leftovers() + cluster.service_network_leftovers()
        nothing = "no process, network namespace, mount or kube-proxy rule"
        print(f"== stopped; left behind: {', '.join(left) if left else nothing}")


def _with_steps(example: Path, steps: int | None, workdir: Path) -> Path:
    """The example, or a copy of it whose TrainJob trains ``steps`` steps."""
    if steps is None:
        return example
    documents = list(yaml.safe_load_all(example.read_text()))
    for document in documents:
        if document["kind"] == "TrainJob":
            arguments = document["spec"]["args"]
            arguments[arguments.index("--steps") + 1] = str(steps)
    copy = workdir / example.name
    copy.write_text(yaml.safe_dump_all(documents))
    return copy


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


_SERVICE_ROW = "  {:<10} {:<6} {:<9} {:<26} {}"


def _serve(cluster: LocalCluster, root: Path, burst_seconds: float) -> bool:
    """Serves the job's checkpoint, asks it a few things, bursts it, and shows it scale up and down."""
    service = next(d for d in yaml.safe_load_all((root / SERVING_EXAMPLE).read_text()))["metadata"]["name"]
    print(f"== serving the checkpoint: applying {SERVING_EXAMPLE}")
    print(cluster.kubectl("apply", "-f", str(root / SERVING_EXAMPLE)).stdout, end="")
    print(_SERVICE_ROW.format("NAME", "READY", "REPLICAS", "MODEL", "REASON"))
    follow = _ServiceRows(cluster, service)
    wait_for(
        lambda: follow.row()["ready"] == "1/1",
        180,
        f"InferenceService {service} ready",
        cluster.assert_running,
    )
    address = cluster.kubectl("get", "service", service, "-o", "jsonpath={.spec.clusterIP}").stdout
    url = f"http://{address}/v1/completions"
    print(f"== asking it through the service's address {url} (greedy, 32 tokens)")
    for prompt in PROMPTS[:3]:
        print(f"  {prompt!r} -> {load.complete(url, prompt)!r}")
    # The demo model's context is 64 tokens: prompt and answer fit in it.
    print(f"== a burst: 12 clients for {burst_seconds:g}s, 48 tokens each request")
    stop_rows = threading.Event()
    printer = threading.Thread(target=follow.until, args=(stop_rows,), daemon=True)
    printer.start()
    results = asyncio.run(load.run(url, PROMPTS, concurrency=12, duration=burst_seconds, max_tokens=48))
    print(f"== burst over: {results.summary()}")
    try:
        if follow.peak > 1:
            print("== waiting for the scale-down")
            wait_for(lambda: follow.last.get("replicas") == "1", 120, "back to one replica")
        else:
            print("the service did not scale up under the burst", file=sys.stderr)
    finally:
        stop_rows.set()
        printer.join()
    decisions = json.loads(
        cluster.kubectl("get", "infsvc", service, "-o", "jsonpath={.status.scaling}").stdout or "[]"
    )
    print("== the autoscaler's decisions (status.scaling)")
    for decision in decisions:
        load_value = decision.get("metricValue")
        shown = f" at load {load_value:g}" if load_value is not None else ""
        print(f"  {decision['time']}  {decision['from']} -> {decision['to']}{shown}: {decision['reason']}")
    return results.failed == 0 and results.answered > 0 and follow.peak > 1


class _ServiceRows:
    """Prints the service's row whenever it changes, as `kubectl get infsvc -w` would."""

    def __init__(self, cluster: LocalCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.printed = ""
        self.last: dict[str, str] = {}
        self.peak = 0

    def row(self) -> dict[str, str]:
        fields = "{.status.ready}|{.status.replicas}|{.status.model.summary}|{.status.reason}"
        raw = self.cluster.kubectl("get", "infsvc", self.name, "-o", f"jsonpath={fields}", check=False).stdout
        ready, replicas, model, reason = [*raw.split("|"), "", "", ""][:4]
        row = {"ready": ready, "replicas": replicas, "model": model, "reason": reason}
        line = _SERVICE_ROW.format(self.name, ready, replicas, model, reason)
        if ready and line != self.printed:
            self.printed = line
            print(line, flush=True)
        self.last = row
        if replicas.isdigit():
            self.peak = max(self.peak, int(replicas))
        return row

    def until(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.row()


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
    print(
        "  kubectl get infsvc demo-chat -o wide      # the service; its router: deployment demo-chat-router"
    )
    print("  curl -s http://$(kubectl get svc demo-chat -o jsonpath='{.spec.clusterIP}')/v1/completions \\")
    print('       -H \'Content-Type: application/json\' -d \'{"prompt": "def ", "max_tokens": 32}\'')
    print(f"  operator log: {cluster.workdir / 'operator.log'}")


if __name__ == "__main__":
    sys.exit(main())
