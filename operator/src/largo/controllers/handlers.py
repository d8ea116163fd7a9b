"""kopf registrations. Thin on purpose: indexes summarise objects, event handlers only wake work.

- indexes over Nodes, Pods and TrainJobs feed the gang scheduler's inventory;
- every TrainJob or TrainJob-pod event enqueues that job for one level-triggered reconcile;
- changes that free or take capacity wake the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import kopf

from largo.api.v1alpha1 import GROUP, PLURAL, VERSION
from largo.build.names import LABEL_JOB_NAME
from largo.controllers.kube import Kube
from largo.controllers.scheduler import Scheduler
from largo.controllers.state import JobKey, job_entry, pod_usage
from largo.controllers.trainjob import TrainJobReconciler
from largo.controllers.workqueue import WorkQueue
from largo.policy.trainjob import BackoffPolicy
from largo.sched import inventory

logger = logging.getLogger(__name__)


def _float_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # largo posts its own events with reasons; kopf's per-handler log events would only add noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.connect_timeout = 10

    kube = Kube.from_environment()
    jobs: WorkQueue[JobKey] = WorkQueue()
    scheduler = Scheduler(
        kube=kube,
        nodes=kwargs["node_inventory"],
        pods=kwargs["pod_inventory"],
        jobs=kwargs["trainjob_queue"],
        wake_job=jobs.add,
        clock=time.time,
    )
    reconciler = TrainJobReconciler(
        kube=kube,
        nodes=kwargs["node_inventory"],
        wake_scheduler=scheduler.wake,
        clock=time.time,
        backoff=BackoffPolicy(
            base=_float_env("LARGO_RESTART_BACKOFF_SECONDS", 10.0),
            cap=_float_env("LARGO_RESTART_BACKOFF_MAX_SECONDS", 300.0),
            binding_timeout=_float_env("LARGO_BINDING_TIMEOUT_SECONDS", 30.0),
        ),
    )
    workers = int(_float_env("LARGO_RECONCILE_WORKERS", 8))
    memo.jobs = jobs
    memo.scheduler = scheduler
    memo.tasks = [
        asyncio.create_task(jobs.run(reconciler.reconcile, workers), name="largo-trainjob-workers"),
        asyncio.create_task(scheduler.run(), name="largo-gang-scheduler"),
    ]


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.get("tasks", []):
        task.cancel()
    await asyncio.gather(*memo.get("tasks", []), return_exceptions=True)


# -- indexes: the inventory, rebuilt from the cluster at every start ---------------------------------


@kopf.index("nodes")
def node_inventory(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {name: inventory.node_info(body)}


@kopf.index("pods")
def pod_inventory(body: kopf.Body, **_: Any) -> dict[str, Any]:
    usage = pod_usage(body)
    if usage is None:
        return {}
    return {body["spec"]["nodeName"]: usage}


@kopf.index(GROUP, VERSION, PLURAL)
def trainjob_queue(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[JobKey, Any]:
    return {(str(namespace), name): job_entry(body)}


# -- wake-ups -----------------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def trainjob_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.add((str(namespace), name))
    memo.scheduler.wake()


@kopf.on.event("pods", labels={LABEL_JOB_NAME: kopf.PRESENT})
def trainjob_pod_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.add((str(namespace), labels[LABEL_JOB_NAME]))


@kopf.on.event("pods")
def capacity_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A pod that stops holding resources frees capacity for the queue."""
    if event.get("type") == "DELETED" or not inventory.pod_holds_resources(body):
        memo.scheduler.wake()


@kopf.on.event("nodes")
def node_changed(name: str, body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    memo.scheduler.wake()
    info = inventory.node_info(body)
    if event.get("type") == "DELETED" or not info.ready or not info.usable:
        # Jobs with pods or placements on this node must notice at once, not at the next resync.
        for store in kwargs["trainjob_queue"].values():
            for entry in store:
                if entry.placement and name in entry.placement:
                    memo.jobs.add(entry.key)
