"""Names and labels derived from a TrainJob; the DNS half of the rendezvous contract.

Every pod gets hostname `<job>-node-<rank>` and subdomain `<job>`, which together with the headless
Service `<job>` (publishNotReadyAddresses) gives rank 0 a DNS name before any pod is ready.
"""

from __future__ import annotations

from largo.api.v1alpha1.common import GROUP, MASTER_PORT, MAX_JOB_NAME_LENGTH, METRICS_PORT
from largo.api.v1alpha1.common import MODEL_MOUNT as MODEL_MOUNT

# MASTER_PORT: the rendezvous. METRICS_PORT: rank 0 serves the trainer's Prometheus metrics there
# (container port `metrics`), as a model server's leader and members do.
__all__ = ["MASTER_PORT", "METRICS_PORT"]
METRICS_PORT_NAME = "metrics"
RENDEZVOUS_PORT_NAME = "rendezvous"
CONTAINER_NAME = "trainer"
CHECKPOINT_VOLUME = "largo-checkpoint"
SHM_VOLUME = "largo-dshm"

LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_NODE_RANK = f"{GROUP}/node-rank"
LABEL_ATTEMPT = f"{GROUP}/attempt"
# On the pod whose process reports the loss, progress and metrics (rank 0's, or with pipeline stages
# the last stage's first): what the chart's PodMonitor selects.
LABEL_REPORTING = f"{GROUP}/reporting"
# On pods of a gang with scheduling.exclusiveNodes: largo's admission holds the whole node for them.
LABEL_EXCLUSIVE = f"{GROUP}/exclusive-node"
# On a job's progress ConfigMap: the job it reports for.
LABEL_PROGRESS_OF = f"{GROUP}/progress-of"
ANNOTATION_PLACEMENT_NODE = f"{GROUP}/placement-node"
# The hash of the spec a pod was built from: every pod of one attempt carries the same one.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"

# A pod name is a hostname, so it must fit one DNS label; the API caps job names to keep it so.
MAX_DNS_LABEL = 63
MAX_JOB_NAME = MAX_JOB_NAME_LENGTH


def service_name(job: str) -> str:
    """The headless Service that gives the pods DNS names."""
    return job


def progress_configmap(job: str) -> str:
    """The ConfigMap rank 0 writes its progress reports into (the only object it needs to write)."""
    return f"{job}-progress"


def pod_name(job: str, rank: int) -> str:
    return f"{job}-node-{rank}"


def hostname(job: str, rank: int) -> str:
    return pod_name(job, rank)


def subdomain(job: str) -> str:
    return service_name(job)


def pod_fqdn(job: str, namespace: str, rank: int) -> str:
    """`<pod>.<service>.<namespace>.svc`: resolvable through the pod's DNS search path whatever the
    cluster domain is, and before readiness thanks to publishNotReadyAddresses."""
    return f"{hostname(job, rank)}.{subdomain(job)}.{namespace}.svc"


def master_addr(job: str, namespace: str) -> str:
    """Rank 0 hosts the torchrun static rendezvous store."""
    return pod_fqdn(job, namespace, 0)


def job_selector(job: str) -> dict[str, str]:
    """Labels that select every pod (all attempts) and the Service endpoints of a job."""
    return {LABEL_JOB_NAME: job}


def gang_selector(job: str, attempt: int) -> dict[str, str]:
    """Labels that select the pods of one gang attempt only."""
    return {LABEL_JOB_NAME: job, LABEL_ATTEMPT: str(attempt)}


def label_selector(labels: dict[str, str]) -> str:
    """A labelSelector query string for the list API."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --- InferenceService (docs/serving.md) -----------------------------------------------------------

LABEL_SERVICE = f"{GROUP}/inferenceservice"
LABEL_REPLICA = f"{GROUP}/replica"
LABEL_MEMBER = f"{GROUP}/member"
LABEL_REVISION = f"{GROUP}/revision"
# The runtime a serving pod runs (largo, vllm, custom): where its metrics are, for a PodMonitor.
LABEL_RUNTIME = f"{GROUP}/runtime"
HTTP_PORT_NAME = "http"
SERVICE_PORT = 80
SERVER_CONTAINER_NAME = "server"
MODEL_VOLUME = "largo-model"


def members_service(service: str) -> str:
    """The headless Service that gives every member of every replica group a DNS name."""
    return f"{service}-members"


def member_pod_name(service: str, replica: int, member: int) -> str:
    return f"{service}-r{replica}-node-{member}"


def leader_addr(service: str, namespace: str, replica: int) -> str:
    """Member 0 of a group: its pipeline's rendezvous, resolvable before it is ready."""
    return f"{member_pod_name(service, replica, 0)}.{members_service(service)}.{namespace}.svc"


def service_url(service: str, namespace: str) -> str:
    """The stable in-cluster address of an InferenceService (its Service, port 80)."""
    return f"http://{service}.{namespace}.svc"


def leader_selector(service: str) -> dict[str, str]:
    """The pods that serve HTTP: the leaders of every group (the Service's and /scale's selector)."""
    return {LABEL_SERVICE: service, LABEL_MEMBER: "0"}


# The router in front of an InferenceService's replicas (docs/serving.md, "The router").
LABEL_ROUTER = f"{GROUP}/router"
ROUTER_HTTP_PORT = 8080
# Seconds a stopping router's HAProxy has to finish the requests in flight after its soft stop.
ROUTER_DRAIN_SECONDS = 25


def router_name(service: str) -> str:
    """The router's Deployment, ServiceAccount, Role and RoleBinding."""
    return f"{service}-router"


def replicas_service(service: str) -> str:
    """The headless Service of the ready leaders, whose EndpointSlices the router follows."""
    return f"{service}-replicas"


def router_selector(service: str) -> dict[str, str]:
    return {LABEL_ROUTER: service}


def host_port(address: str, port: int) -> str:
    """``address:port``, an IPv6 address in brackets (as an IPv6 cluster's pods and EndpointSlices
    give it)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
