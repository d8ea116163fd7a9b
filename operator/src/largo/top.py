"""``largo top``: GPU allocation, the queue and running jobs in a terminal, for people without Grafana.

The numbers are the operator's metrics' own (``largo.metrics``), computed from one listing of nodes,
pods, TrainJobs and InferenceServices. ``render`` is pure; ``run`` lists, renders, and refreshes like
``top`` on a terminal (plain output, once, when stdout is not one).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import Any

from largo.api.v1alpha1 import Phase
from largo.metrics import BACK_OFF, Snapshot, jobs_by_phase, largest_gangs, node_gpus, queue_gpus, stranded

BAR_WIDTH = 24


def _bar(counts: Mapping[str, int], width: int = BAR_WIDTH) -> str:
    """``#`` held by largo, ``+`` by other pods, ``.`` free: one cell per GPU, scaled to ``width``."""
    total = counts.get("allocatable", 0)
    if total <= 0:
        return "[" + " " * width + "]"
    cells = min(width, total)
    # Held can pass allocatable (a GPU the device plugin marked unhealthy under a running pod): the bar
    # stays its width, full.
    largo = min(cells, round(cells * counts.get("largo", 0) / total))
    other = min(cells - largo, round(cells * counts.get("other", 0) / total))
    return "[" + "#" * largo + "+" * other + "." * (cells - largo - other) + "]"


def render(snapshot: Snapshot) -> str:
    """The whole screen as plain text (pure)."""
    per_node = node_gpus(snapshot)
    total = sum(counts["allocatable"] for counts in per_node.values())
    held = sum(counts["largo"] + counts["other"] for counts in per_node.values())
    lines = [
        f"GPUs: {held}/{total} held ({100 * held / total if total else 0:.0f}%), "
        f"stranded for the head of the queue: {stranded(snapshot, per_node)}, "
        "pods that fit now: "
        + ", ".join(
            f"{pods} of {shape} GPU{'s' if shape > 1 else ''}"
            for shape, pods in sorted(largest_gangs(snapshot, per_node).items())
        ),
        "",
        f"{'NODE':<24} {'GPUS':<{BAR_WIDTH + 2}} {'LARGO':>5} {'OTHER':>5} {'FREE':>5}",
    ]
    for name, counts in sorted(per_node.items()):
        lines.append(
            f"{name:<24} {_bar(counts):<{BAR_WIDTH + 2}} {counts['largo']:>5} {counts['other']:>5} "
            f"{counts['free']:>5}"
        )
    lines += [
        "",
        f"{'NAMESPACE':<20} {'QUEUE':<16} {'REQUESTED':>9} {'ALLOCATED':>9} {'WAITING':>7} {'JOBS':>4}",
    ]
    for (namespace, queue), states in sorted(queue_gpus(snapshot).items()):
        lines.append(
            f"{namespace:<20} {queue:<16} {states['requested']:>9} {states['allocated']:>9} "
            f"{states['waiting']:>7} {states['jobs']:>4}"
        )
    # Jobs and serving replica groups (service#r<replica>) share the queue.
    # One in its restart back-off shows BackOff (the scheduler leaves it be, so it has no reason yet).
    back_off = {"reason": BACK_OFF}
    queued: list[tuple[tuple[str, str], Mapping[str, Any]]] = [
        (entry.key, entry.queue if entry.due(snapshot.now) else back_off)
        for entry in snapshot.jobs
        if entry.admissible
    ]
    queued += [
        (group.gang(*service.key), group.queue)
        for service in snapshot.services
        for group in service.waiting(snapshot.now)
    ]
    queued += [
        (group.gang(*service.key), back_off)
        for service in snapshot.services
        for group in service.backing_off(snapshot.now)
    ]
    lines += ["", f"{'QUEUED':<32} {'POS':>3}  REASON"]
    for key, told in sorted(queued, key=lambda item: (item[1].get("position") or 10**9, item[0])):
        position = told.get("position")
        reason = told.get("reason") or "New"
        message = told.get("message") or ""
        lines.append(f"{'/'.join(key):<32} {position or '-':>3}  {reason}: {message}".rstrip(": "))
    running = [entry for entry in snapshot.jobs if entry.phase in (Phase.STARTING, Phase.RUNNING)]
    lines += ["", f"{'RUNNING':<32} {'PHASE':<9} {'NODES':<6} PROGRESS"]
    for entry in sorted(running, key=lambda entry: entry.key):
        status: Mapping[str, Any] = entry.body.get("status") or {}
        progress = (status.get("progress") or {}).get("summary", "")
        lines.append(f"{'/'.join(entry.key):<32} {entry.phase!s:<9} {status.get('nodes', ''):<6} {progress}")
    phases = ", ".join(
        f"{phase} {count}" for phase, count in sorted(jobs_by_phase(snapshot.jobs).items()) if count
    )
    lines += ["", f"TrainJobs: {phases or 'none'}"]
    return "\n".join(lines) + "\n"


def snapshot_from_cluster(core: Any, custom: Any) -> Snapshot:
    """One listing of the cluster, read as the operator's indexes read it."""
    from largo.api.v1alpha1 import GROUP, PLURAL, SERVICE_PLURAL, VERSION
    from largo.controllers.state import job_entry, pod_usage, service_entry
    from largo.sched.inventory import node_info

    api = core.api_client
    nodes = [node_info(api.sanitize_for_serialization(node)) for node in core.list_node().items]
    pods = []
    for pod in core.list_pod_for_all_namespaces().items:
        usage = pod_usage(api.sanitize_for_serialization(pod))
        if usage is not None:
            pods.append((str(pod.spec.node_name), usage))
    listed = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    jobs = [job_entry(item) for item in listed["items"]]
    # Serving groups hold GPUs (admitted members whose pods are not bound yet) and queue with the jobs:
    # without them, the numbers would not be the metrics' (``handlers._snapshot``).
    listed = custom.list_cluster_custom_object(GROUP, VERSION, SERVICE_PLURAL)
    services = [service_entry(item) for item in listed["items"]]
    return Snapshot(nodes=nodes, pods=pods, jobs=jobs, now=time.time(), services=services)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = subparsers.add_parser("top", help="GPU allocation, the queue and running jobs (uses KUBECONFIG)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print once and exit (the default off a terminal)")
    top.set_defaults(handler=run)


def run(args: argparse.Namespace, out: Any = None) -> int:
    from kubernetes import client, config

    out = out or sys.stdout
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    live = not args.once and out.isatty()
    while True:
        screen = render(snapshot_from_cluster(core, custom))
        if not live:
            out.write(screen)
            return 0
        out.write("\x1b[H\x1b[2J" + screen)  # home and clear, as top redraws
        out.flush()
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
