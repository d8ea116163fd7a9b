"""Benchmark: create-to-all-pods-Running for TrainJobs, against creating the same pods directly.

On one local cluster with 200 kwok nodes of 8 GPUs, in the same run:
- baseline: for each of N jobs, the client creates its pods directly (same pod shape, no operator);
- largo: the client creates N TrainJobs and the operator admits, places and creates the pods.
Each job's time is from the moment its first create call starts to the moment its last pod is Running.
Prints p50 and p99 of both, their ratios, and the operator's RSS at the end.

    .venv/bin/python bench/trainjob_admission.py [--jobs 50] [--nodes-per-job 4] [--nodes 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from largo.dev.cluster import (
    ClusterSpec,
    LocalCluster,
    NodePool,
    wait_for,
)
from largo.dev.operator_process import OperatorProcess

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "trainjobs"
# The client's generated types do not accept plain manifests; the benchmark talks JSON.
kube_config: Any = config
kube_watch: Any = watch
REPO = Path(__file__).resolve().parents[1]


class RunningClock:
    """Watches pods in a namespace and records when each job's pods first reach Running."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.namespace = namespace
        self.running: dict[str, dict[str, float]] = {}
        self.created: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            stream = kube_watch.Watch()
            for event in stream.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                pod = event["object"]
                job = (pod.metadata.labels or {}).get("bench/job")
                if job:
                    self.created.setdefault(job, {}).setdefault(pod.metadata.name, time.monotonic())
                if job and pod.status.phase == "Running":
                    self.running.setdefault(job, {}).setdefault(pod.metadata.name, time.monotonic())
                if self._stop.is_set():
                    stream.stop()

    def done_at(self, job: str, pods: int) -> float | None:
        seen = self.running.get(job, {})
        return max(seen.values()) if len(seen) >= pods else None

    def created_at(self, job: str) -> float:
        return max(self.created[job].values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    api: client.ApiClient,
    namespace: str,
    jobs: int,
    pods_per_job: int,
    create: Callable[[str], None],
) -> tuple[list[float], list[float]]:
    """Per job: seconds from its first create call to all its pods Running, and to all of them created."""
    clock = RunningClock(api, namespace)
    started: dict[str, float] = {}
    names = [f"job-{index}" for index in range(jobs)]

    def submit(name: str) -> None:
        started[name] = time.monotonic()
        create(name)

    # The same client and the same concurrency for both runs.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(submit, names))
    wait_for(
        lambda: all(clock.done_at(n, pods_per_job) for n in names),
        600,
        "every pod Running",
    )
    clock.stop()
    running = [float(clock.done_at(n, pods_per_job) or 0) - started[n] for n in names]
    created = [clock.created_at(n) - started[n] for n in names]
    return running, created


def pod_manifest(job: str, rank: int, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{job}-node-{rank}", "labels": {"bench/job": job}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": "trainer:bench",
                    "resources": {
                        "limits": {"nvidia.com/gpu": str(gpus)},
                        "requests": {"cpu": "1"},
                    },
                }
            ],
        },
    }


def trainjob_manifest(job: str, nodes: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": job},
        "spec": {
            "image": "trainer:bench",
            "numNodes": nodes,
            "resourcesPerNode": {"nvidia.com/gpu": gpus, "cpu": "1"},
            "podTemplate": {"labels": {"bench/job": job}},
        },
    }


def has_default_account(core: Any, namespace: str) -> bool:
    return bool(core.list_namespaced_service_account(namespace).items)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--nodes-per-job", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per pod")
    parser.add_argument("--nodes", type=int, default=200)
    args = parser.parse_args()

    spec = ClusterSpec(node_pools=(NodePool(count=args.nodes, name_prefix="bench-gpu"),))
    with LocalCluster(spec) as cluster:
        api = kube_config.new_client_from_config(config_file=str(cluster.kubeconfig))
        core: Any = client.CoreV1Api(api)
        custom: Any = client.CustomObjectsApi(api)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(path))
        for namespace in ("baseline", "largo"):
            core.create_namespace({"metadata": {"name": namespace}})
            wait_for(partial(has_default_account, core, namespace), 60, "ServiceAccount")

        def create_direct(job: str) -> None:
            for rank in range(args.nodes_per_job):
                core.create_namespaced_pod("baseline", pod_manifest(job, rank, args.gpus))

        baseline, baseline_created = measure(api, "baseline", args.jobs, args.nodes_per_job, create_direct)
        core.delete_collection_namespaced_pod("baseline", grace_period_seconds=0)
        wait_for(
            lambda: not core.list_namespaced_pod("baseline").items,
            300,
            "baseline pods gone",
        )

        # Measure admissions, not the operator's start-up: start() waits for its liveness endpoint.
        operator = OperatorProcess(cluster.kubeconfig, cluster.workdir / "operator.log")
        operator.start()
        try:

            def create_trainjob(job: str) -> None:
                custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    "largo",
                    PLURAL,
                    trainjob_manifest(job, args.nodes_per_job, args.gpus),
                )

            largo, largo_created = measure(api, "largo", args.jobs, args.nodes_per_job, create_trainjob)
            rss = rss_kib(operator.pid)
        finally:
            operator.stop()

    rows: list[tuple[str, list[float]]] = [
        ("baseline: pods Running", baseline),
        ("largo: pods Running", largo),
        ("baseline: pods created", baseline_created),
        ("largo: pods created", largo_created),
    ]
    print(f"{args.jobs} jobs x {args.nodes_per_job} pods x {args.gpus} GPUs on {args.nodes} kwok nodes")
    print("create-to-all-pods-Running per job (the target), and create-to-all-pods-created (where time goes)")
    for label, values in rows:
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        print(f"  {label:24s} p50 {p50:6.2f}s  p99 {p99:6.2f}s  mean {statistics.fmean(values):6.2f}s")
    ratio50 = statistics.median(largo) / statistics.median(baseline)
    ratio99 = percentile(largo, 0.99) / percentile(baseline, 0.99)
    print(f"  ratio largo/baseline     p50 {ratio50:.2f}x  p99 {ratio99:.2f}x  (target < 1.25x)")
    print(f"  operator RSS at the end  {rss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
