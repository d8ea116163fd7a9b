"""Small verbs over the TrainJob API for the integration tests (one test namespace each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client
from largo.dev.cluster import NodePool, wait_for

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "trainjobs"
EXIT_ANNOTATION = "kwok.largo.dev/exit-code"
TIMEOUT = 90


class Jobs:
    """Small verbs over the TrainJob API for one test namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, operator: Any) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.operator = operator

    def create(
        self,
        name: str,
        pool: NodePool | None,
        num_nodes: int = 2,
        gpus: int = 8,
        **spec: Any,
    ) -> None:
        # kwok removes a deleted pod at a random moment within its grace period, as a kubelet might.
        template = {"terminationGracePeriodSeconds": 1, **spec.pop("podTemplate", {})}
        if pool is not None:
            template["nodeSelector"] = dict(pool.labels)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainJob",
            "metadata": {"name": name},
            "spec": {
                "image": "trainer:test",
                "command": ["python", "train.py"],
                "numNodes": num_nodes,
                "resourcesPerNode": {
                    "nvidia.com/gpu": gpus,
                    "cpu": "1",
                    "memory": "1Gi",
                },
                "podTemplate": template,
                **spec,
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return job

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every job's status in one list: one snapshot of the namespace, not reads a moment apart."""
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return {job["metadata"]["name"]: job.get("status") or {} for job in listed["items"]}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def wait(self, name: str, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        wait_for(
            lambda: condition(self.status(name)),
            TIMEOUT,
            f"{name}: {what}",
            self.operator.assert_alive,
        )
        return self.status(name)

    def wait_phase(self, name: str, phase: str) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") == phase, f"phase {phase}")

    def pods(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"largo.dev/job-name={name}"
        ).items
        return sorted(items, key=lambda pod: pod.metadata.name)

    def live_pods(self, name: str) -> list[Any]:
        return [pod for pod in self.pods(name) if pod.metadata.deletion_timestamp is None]

    def exit(self, name: str, code: int, rank: int | None = None) -> None:
        """Makes the job's running pods (or one rank) end with ``code``."""
        for pod in self.live_pods(name):
            if rank is None or pod.metadata.labels["largo.dev/node-rank"] == str(rank):
                self.core.patch_namespaced_pod(
                    pod.metadata.name,
                    self.namespace,
                    {"metadata": {"annotations": {EXIT_ANNOTATION: str(code)}}},
                )

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind=TrainJob",
        ).items
        return [(event.reason, event.message) for event in items]

    def wait_event(self, name: str, *reasons: str) -> list[str]:
        """Waits until the job has an event with one of ``reasons`` (events follow the status write)."""

        def seen() -> bool:
            return any(reason in reasons for reason, _ in self.events(name))

        wait_for(seen, TIMEOUT, f"{name}: an event {' or '.join(reasons)}")
        return [reason for reason, _ in self.events(name)]

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        raise AssertionError(f"{name} has no condition {type_}: {self.status(name)}")


def refuse_pods(core: client.CoreV1Api, namespace: str) -> None:
    """A ResourceQuota of no pods in ``namespace``, once the controller-manager has observed it (until
    then the API server admits pods): every pod create there is refused. Named ``no-pods``."""
    quota = {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    core.create_namespaced_resource_quota(namespace, quota)

    def observed() -> bool:
        status = core.read_namespaced_resource_quota("no-pods", namespace).status
        return bool(status and status.hard)

    wait_for(observed, TIMEOUT, "the quota observed by the controller-manager")


def overbooked(jobs: Jobs, names: list[str], gpus_per_job: int, gpus_per_node: int) -> dict[str, int]:
    """Nodes whose GPUs, summed over every admitted job's status.placement, exceed what they have. Read in
    one list: read one by one, a job seen running before it finished and another seen placed on its
    freed node after, a moment later, would look like an overbooked node."""
    held: dict[str, int] = {}
    statuses = jobs.statuses()
    for name in names:
        status = statuses.get(name, {})
        placement = status.get("placement") or {}
        if status.get("phase") in ("Starting", "Running") and placement.get("attempt") == status.get(
            "attempt"
        ):
            for node in placement.get("nodes") or []:
                held[node] = held.get(node, 0) + gpus_per_job
    return {node: gpus for node, gpus in held.items() if gpus > gpus_per_node}


def bound_claim(core: client.CoreV1Api, namespace: str, name: str, access_mode: str, **source: Any) -> str:
    """A claim ``name`` bound to a volume made for it (``source``: its ``hostPath``, or ``local`` and
    ``nodeAffinity``), so that kube-scheduler places the pods that mount it. Returns the volume's name:
    volumes are cluster-wide, the caller deletes it."""
    volume = f"{name}-{namespace}"
    core.create_persistent_volume(
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [access_mode],
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": name},
                **source,
            },
        }
    )
    claim = {
        "metadata": {"name": name},
        "spec": {
            "storageClassName": "",
            "volumeName": volume,
            "accessModes": [access_mode],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    core.create_namespaced_persistent_volume_claim(namespace, claim)
    return volume
