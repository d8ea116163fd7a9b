"""InferenceService: a model served on GPUs by replica groups that the gang scheduler admits whole.

A replica is a group of ``nodesPerReplica`` pods (member 0 the leader): one pod for a model that fits a
node, several for a model split over nodes. The same models-first rules as the TrainJob hold: every CEL
rule declared here has a pydantic twin raising the same message (see `largo.api.crd`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from largo.api.v1alpha1.common import (
    MASTER_PORT,
    METRICS_PORT,
    MODEL_MOUNT,
    NO_PARENT_STEP_RULE,
    RAY_PORT,
    Condition,
    ObjectMeta,
    SpecModel,
    StatusModel,
    cel,
    check_name,
    root_config,
    stays_inside,
    validations,
)
from largo.api.v1alpha1.trainjob import (
    _CEL_RESERVED_NAMES,
    _CEL_RESERVED_PREFIXES,
    GPU_RESOURCE,
    EnvVar,
    FreeForm,
    PodTemplate,
    Quantity,
    QueueStatus,
    Scheduling,
    _plain,
    check_resources,
    check_status_of,
    is_reserved_env_name,
    sanitize_status_of,
)

SERVICE_KIND = "InferenceService"
SERVICE_PLURAL = "inferenceservices"
SERVICE_SINGULAR = "inferenceservice"
# `isvc` is KServe's: both may be installed in one cluster.
SERVICE_SHORT_NAMES = ["infsvc"]

# Pods are named `<service>-r<replica>-node-<member>`: with replica ids below 10000 and members below
# 64 ("-r9999-node-63", 14 characters) a 45-character name keeps them within a 63-character DNS label.
MAX_SERVICE_NAME_LENGTH = 45
MAX_REPLICAS = 1000
MAX_NODES_PER_REPLICA = 64
MAX_SCALING_DECISIONS = 10
DEFAULT_HTTP_PORT = 8000

MSG_SERVICE_NAME_TOO_LONG = (
    f"metadata.name must be at most {MAX_SERVICE_NAME_LENGTH} characters: pods are named "
    "<name>-r<replica>-node-<member> and must fit a 63-character DNS label"
)
MSG_SERVICE_NAME_FORMAT = (
    "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
    "letter) because it also names the service's Service"
)
MSG_MODEL_ONE_SOURCE = "spec.model: set exactly one of claimName or fromTrainJob"
MSG_MODEL_PATH_WITHOUT_CLAIM = "spec.model.path is a directory inside spec.model.claimName: set claimName"
MSG_CUSTOM_NEEDS_IMAGE = "spec.runtime.image is required when spec.runtime.type is custom"
MSG_RESERVED_PORT = (
    f"spec.runtime.port must not be {METRICS_PORT} (the metrics page) or {MASTER_PORT} (the pipeline's "
    "rendezvous): every pod of the service listens there"
)
MSG_RAY_PORT = (
    f"spec.runtime.port must not be {RAY_PORT} with spec.runtime.type vllm and spec.nodesPerReplica over 1: "
    "the leader of a replica of several pods starts Ray there"
)
MSG_MODEL_PATH_UP = (
    "spec.model.path must not contain '..': it is the model volume's subPath, which Kubernetes refuses "
    "with '..'"
)
MSG_MODEL_MOUNT = (
    f"spec.podTemplate.volumeMounts must not mount over {MODEL_MOUNT}, where the model is mounted"
)
MSG_VLLM_NEEDS_GPUS = (
    f"spec.resourcesPerNode['{GPU_RESOURCE}'] must be at least 1 with spec.runtime.type vllm: "
    "vLLM serves on GPUs only"
)
MSG_GPU_WHOLE = f"spec.resourcesPerNode['{GPU_RESOURCE}'] must be a whole non-negative number"
MSG_MIN_ABOVE_MAX = "spec.autoscaling.minReplicas must be <= spec.autoscaling.maxReplicas"
MSG_ROLLOUT_BOTH_ZERO = (
    "spec.rollout: maxSurge and maxUnavailable cannot both be 0 (no replica could ever be replaced)"
)
MSG_RESERVED_ENV = (
    "spec.env: names starting with PET_ or LARGO_ and the torch.distributed names are reserved; "
    "largo sets them"
)


class RuntimeType(StrEnum):
    """Which server runs in the pods; a preset only builds the container, every part can be overridden."""

    LARGO = "largo"
    VLLM = "vllm"
    CUSTOM = "custom"


class ScalingMetric(StrEnum):
    IN_FLIGHT = "inFlight"
    REQUESTS_PER_SECOND = "requestsPerSecond"


class ServicePhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    DEGRADED = "Degraded"
    SCALED_TO_ZERO = "ScaledToZero"


class ServiceConditionType(StrEnum):
    READY = "Ready"
    MODEL_READY = "ModelReady"
    PROGRESSING = "Progressing"
    SCALING_LIMITED = "ScalingLimited"
    SCALING_CONFLICT = "ScalingConflict"


class ServiceReason(StrEnum):
    # ModelReady.
    MODEL_RESOLVED = "ModelResolved"
    TRAIN_JOB_NOT_FOUND = "TrainJobNotFound"
    TRAIN_JOB_WITHOUT_CHECKPOINT = "TrainJobWithoutCheckpoint"
    TRAIN_JOB_FAILED = "TrainJobFailed"
    WAITING_FOR_CHECKPOINT = "WaitingForCheckpoint"
    CLAIM_NOT_FOUND = "ClaimNotFound"
    NEWER_CHECKPOINT = "NewerCheckpoint"
    # A followed job's newest checkpoint is older than the one served (it went back to an earlier one).
    OLDER_CHECKPOINT = "OlderCheckpoint"
    # Ready.
    ALL_REPLICAS_READY = "AllReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    SCALED_TO_ZERO = "ScaledToZero"
    INVALID_SPEC = "InvalidSpec"
    # Replica groups.
    GROUP_ADMITTED = "GroupAdmitted"
    GROUP_RESTARTED = "GroupRestarted"
    GROUP_RETIRED = "GroupRetired"
    CREATE_REFUSED = "CreateRefused"
    NAME_CONFLICT = "NameConflict"
    # Scaling.
    SCALED = "Scaled"
    WITHIN_BOUNDS = "WithinBounds"
    CLAMPED = "Clamped"
    NO_CONFLICT = "NoConflict"
    HORIZONTAL_POD_AUTOSCALER = "HorizontalPodAutoscaler"


# --- spec ------------------------------------------------------------------------------------


class FromTrainJob(SpecModel):
    """Serve a TrainJob's newest complete checkpoint, from the job's checkpoint claim."""

    name: str = Field(
        min_length=1, max_length=253, description="The TrainJob, in the InferenceService's namespace."
    )
    follow: bool = Field(
        default=False,
        description="Roll out each newer complete checkpoint the job writes (continuous deployment of a "
        "model in training); otherwise the checkpoint served first stays until the spec changes.",
    )


class ModelSource(SpecModel):
    """Where the model comes from: a claim (and a directory in it) or a TrainJob's checkpoints."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.claimName) != has(self.fromTrainJob)", MSG_MODEL_ONE_SOURCE),
            cel("!has(self.path) || has(self.claimName)", MSG_MODEL_PATH_WITHOUT_CLAIM, field_path=".path"),
        )
    )

    claim_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="PersistentVolumeClaim holding the model."
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=r"^[^/]",
        description="Directory inside the claim, relative to its root; the root when unset (no '..').",
        json_schema_extra=validations(cel(NO_PARENT_STEP_RULE, MSG_MODEL_PATH_UP)),
    )
    from_train_job: FromTrainJob | None = None

    @field_validator("path")
    @classmethod
    def _stays_inside(cls, value: str | None) -> str | None:
        return stays_inside(value, MSG_MODEL_PATH_UP)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.claim_name is None) == (self.from_train_job is None):
            raise ValueError(MSG_MODEL_ONE_SOURCE)
        if self.path is not None and self.claim_name is None:
            raise ValueError(MSG_MODEL_PATH_WITHOUT_CLAIM)
        return self


class Runtime(SpecModel):
    """The model server. `largo` and `vllm` are presets that build the container; `custom` is yours."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.type != 'custom' || has(self.image)", MSG_CUSTOM_NEEDS_IMAGE, field_path=".image"),
            cel(
                f"!has(self.port) || (self.port != {METRICS_PORT} && self.port != {MASTER_PORT})",
                MSG_RESERVED_PORT,
                field_path=".port",
            ),
        )
    )

    type: RuntimeType = Field(default=RuntimeType.LARGO, description="largo, vllm or custom.")
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Container image; the preset's image when unset (required for custom).",
    )
    command: list[str] | None = Field(default=None, max_length=1024, description="Overrides the preset's.")
    args: list[str] | None = Field(
        default=None,
        max_length=4096,
        description="For a preset, appended to its arguments (a flag given again wins); "
        "for custom, the args.",
    )
    port: int = Field(
        default=DEFAULT_HTTP_PORT, ge=1, le=65535, description="HTTP port the leader serves on."
    )
    readiness_probe: FreeForm | None = Field(
        default=None, description="core/v1 Probe; the preset's (GET /readyz on the port) when unset."
    )
    liveness_probe: FreeForm | None = Field(
        default=None, description="core/v1 Probe; the preset's (GET /healthz on the port) when unset."
    )

    @model_validator(mode="after")
    def _custom_image(self) -> Self:
        if self.type is RuntimeType.CUSTOM and self.image is None:
            raise ValueError(MSG_CUSTOM_NEEDS_IMAGE)
        if self.port in (METRICS_PORT, MASTER_PORT):
            raise ValueError(MSG_RESERVED_PORT)
        return self


class Autoscaling(SpecModel):
    """largo owns spec.replicas within these bounds and sets it from the replicas' load."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.minReplicas <= self.maxReplicas", MSG_MIN_ABOVE_MAX, field_path=".minReplicas")
        )
    )

    min_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS, description="Fewest replicas under load.")
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS, description="Most replicas.")
    metric: ScalingMetric = Field(
        default=ScalingMetric.IN_FLIGHT,
        description="inFlight: requests being served per replica; requestsPerSecond: finished per second.",
    )
    target: float = Field(
        default=4.0, gt=0, le=1e6, allow_inf_nan=False, description="Wanted value of the metric per replica."
    )
    stable_window_seconds: int = Field(
        default=60, ge=6, le=3600, description="Load is averaged over this window (a tenth of it: panic)."
    )
    scale_down_delay_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="Scale down only to the highest replicas wanted over this window (by the stable "
        "window's load, or the panic window's when it was a burst: at least twice the stable window's "
        "need); scale-up is at once. "
        "With scaleToZero, zero waits this long too.",
    )
    scale_to_zero: bool = Field(
        default=False,
        description="Below minReplicas to zero when idle (no load for stableWindowSeconds, then for "
        "scaleDownDelaySeconds, at least 30 s); the first request brings one back.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(MSG_MIN_ABOVE_MAX)
        return self


class Rollout(SpecModel):
    """How replicas are replaced when the image, args, model or runtime change."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.maxSurge > 0 || self.maxUnavailable > 0", MSG_ROLLOUT_BOTH_ZERO, field_path=".maxSurge")
        )
    )

    max_surge: int = Field(default=1, ge=0, le=MAX_REPLICAS, description="Replicas above spec.replicas.")
    max_unavailable: int = Field(
        default=0, ge=0, le=MAX_REPLICAS, description="Ready replicas below spec.replicas."
    )
    min_ready_seconds: int = Field(
        default=0,
        ge=0,
        le=3600,
        description="How long a new group must have been ready before it counts as available: an old "
        "group is retired only then (a server that crashes soon after it first turns ready never counts).",
    )
    progress_deadline_seconds: int = Field(
        default=600,
        ge=1,
        le=86400,
        description="How long a group of the current revision may take from its admission to ready "
        "before the rollout counts as stalled: it creates nothing more and retires only for a "
        "scale-down, so the old groups keep serving, and Progressing=False says so "
        "(ProgressDeadlineExceeded) until the group is ready or the spec changes.",
    )

    @model_validator(mode="after")
    def _not_both_zero(self) -> Self:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError(MSG_ROLLOUT_BOTH_ZERO)
        return self


class Router(SpecModel):
    """The router in front of the replicas: HAProxy balancing by outstanding requests, holding requests
    while no replica is ready (docs/serving.md)."""

    replicas: int = Field(default=1, ge=1, le=16, description="Router pods (each balances on its own).")
    hold_timeout_seconds: int = Field(
        default=300,
        ge=1,
        le=3600,
        description="How long a request waits for a first ready replica (scale from zero, a replica "
        "starting) before a 503 with Retry-After.",
    )
    stream_keepalive_seconds: int = Field(
        default=15,
        ge=0,
        le=300,
        description='A held streaming request ("stream": true) that has waited this long gets its event '
        "stream started (status 200) and an SSE comment every period until a replica answers, so that "
        "an idle timeout between the client and the router (a load balancer's 60 s) does not cut it "
        "while a model loads; the replica's events follow, and an error (the hold timeout, a 400) "
        "comes as an error event. 0: held in silence, answered with the replica's status.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Where router pods run (they need no GPU)."
    )
    tolerations: list[FreeForm] = Field(default_factory=list, description="core/v1 Tolerations.")


class InferenceServiceSpec(SpecModel):
    """Desired state of an InferenceService."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                f"!has(self.runtime) || self.runtime.type != 'vllm' || "
                f"('{GPU_RESOURCE}' in self.resourcesPerNode"
                f" && int(string(self.resourcesPerNode['{GPU_RESOURCE}'])) >= 1)",
                MSG_VLLM_NEEDS_GPUS,
                field_path=".resourcesPerNode",
            ),
            cel(
                f"!has(self.runtime) || self.runtime.type != 'vllm' || !has(self.nodesPerReplica)"
                f" || self.nodesPerReplica < 2 || !has(self.runtime.port) || self.runtime.port != {RAY_PORT}",
                MSG_RAY_PORT,
                field_path=".runtime.port",
            ),
        )
    )

    model: ModelSource
    # Defaults spelt out whole: the API server checks a default against the CEL rules as it is written.
    runtime: Runtime = Field(
        default_factory=Runtime,
        json_schema_extra={"default": {"type": RuntimeType.LARGO.value, "port": DEFAULT_HTTP_PORT}},
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=MAX_REPLICAS,
        description="Replica groups wanted (the /scale subresource); largo sets it when autoscaling is on.",
    )
    nodes_per_replica: int = Field(
        default=1,
        ge=1,
        le=MAX_NODES_PER_REPLICA,
        description="Pods per replica group: the model's pipeline stages. Like a TrainJob's pods they "
        "share a node that has room for several, unless scheduling.exclusiveNodes gives each its own.",
    )
    resources_per_node: dict[str, Quantity] = Field(
        default_factory=dict,
        json_schema_extra={
            "default": {},
            "maxProperties": 32,
            **validations(
                cel(
                    f"!('{GPU_RESOURCE}' in self) || string(self['{GPU_RESOURCE}']).matches('^[0-9]+$')",
                    MSG_GPU_WHOLE,
                )
            ),
        },
        description="Requests (and equal limits) of each pod, e.g. nvidia.com/gpu: 8.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **validations(
                cel(
                    f"self.all(e, !(e.name in {_CEL_RESERVED_NAMES}) && {_CEL_RESERVED_PREFIXES})",
                    MSG_RESERVED_ENV,
                )
            ),
        },
        description="Extra environment for the server container.",
    )
    autoscaling: Autoscaling | None = None
    rollout: Rollout = Field(
        default_factory=Rollout,
        json_schema_extra={"default": {"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 0}},
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, json_schema_extra={"default": {}})
    pod_template: PodTemplate = Field(default_factory=PodTemplate)
    router: Router = Field(
        default_factory=Router,
        json_schema_extra={
            "default": {"replicas": 1, "holdTimeoutSeconds": 300, "streamKeepaliveSeconds": 15}
        },
    )

    @field_validator("resources_per_node", mode="before")
    @classmethod
    def _fractional_gpus(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and isinstance(value.get(GPU_RESOURCE), float):
            raise ValueError(MSG_GPU_WHOLE)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_resources(self.resources_per_node)
        gpus = self.resources_per_node.get(GPU_RESOURCE)
        if self.runtime.type is RuntimeType.VLLM and int(gpus or 0) < 1:
            raise ValueError(MSG_VLLM_NEEDS_GPUS)
        ray = self.runtime.type is RuntimeType.VLLM and self.nodes_per_replica > 1
        if ray and self.runtime.port == RAY_PORT:
            raise ValueError(MSG_RAY_PORT)
        names = [e.name for e in self.env]
        if any(is_reserved_env_name(n) for n in names):
            raise ValueError(MSG_RESERVED_ENV)
        if len(set(names)) != len(names):
            raise ValueError("spec.env: names must be unique")
        if self.pod_template.mounts_over(MODEL_MOUNT):
            raise ValueError(MSG_MODEL_MOUNT)
        return self


# --- status ----------------------------------------------------------------------------------


class ServedModel(StatusModel):
    """What the replicas of the current revision serve."""

    claim_name: str | None = None
    path: str | None = Field(default=None, description="Directory inside the claim.")
    train_job: str | None = Field(default=None, description="The TrainJob whose checkpoint is served.")
    checkpoint_step: int | None = Field(default=None, ge=0, description="Step of the served checkpoint.")
    summary: str | None = Field(default=None, description="Shown in the MODEL column.")


class CreateRefusal(StatusModel):
    """The API server refuses the pods of a group's attempt (a quota, a webhook, PodSecurity)."""

    attempt: int = Field(ge=0)
    since: datetime = Field(
        description="When the refusals began: the group's GPUs are released after the binding timeout."
    )
    reason: str = Field(max_length=128, description="CreateRefused or NameConflict.")
    message: str = Field(max_length=32768, description="The API server's message.")


class GroupStatus(StatusModel):
    """One replica group: queued (no nodes) until the gang scheduler admits it whole."""

    replica: int = Field(ge=0, description="Its pods are <name>-r<replica>-node-<member>.")
    revision: str = Field(description="Hash of the spec its pods are built from (largo.dev/revision).")
    attempt: int = Field(default=0, ge=0, description="Incremented at each restart of the whole group.")
    nodes: list[str] = Field(default_factory=list, description="nodes[m] hosts member m; empty while queued.")
    queued_at: datetime | None = Field(default=None, description="When it joined the admission queue.")
    admitted_at: datetime | None = None
    ready: bool = Field(default=False, description="Every member running and ready.")
    formed: bool = Field(
        default=False,
        description="Every member of this attempt has existed: one missing after that was deleted, "
        "and the group restarts whole.",
    )
    ready_since: datetime | None = Field(default=None, description="Since when, without interruption.")
    unready_since: datetime | None = Field(
        default=None,
        description="Since when a group that was ready is not: the rollout's progress deadline counts "
        "from then (from its admission for one never ready yet).",
    )
    restarts: int = Field(default=0, ge=0, description="Restarts after a failure.")
    failures: int = Field(
        default=0, ge=0, description="Restarts since it last served: what tells a rollout that cannot start."
    )
    restart_after: datetime | None = Field(default=None, description="A failed group waits till then.")
    retiring: bool = Field(default=False, description="Being drained and removed (rollout or scale-down).")
    queue: QueueStatus | None = Field(default=None, description="Why it waits, while not admitted.")
    create_refused: CreateRefusal | None = Field(default=None, description="Why its pods are not created.")


class ScalingDecision(StatusModel):
    """One change of the replicas, by the autoscaler or by a write to spec.replicas."""

    time: datetime
    from_replicas: int = Field(ge=0, alias="from")
    to_replicas: int = Field(ge=0, alias="to")
    metric_value: float | None = Field(default=None, allow_inf_nan=False, description="Load it used.")
    reason: str = Field(max_length=1024)


class InferenceServiceStatus(StatusModel):
    """Observed state; written by the operator only."""

    phase: ServicePhase | None = None
    reason: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    replicas: int | None = Field(default=None, ge=0, description="Replica groups that exist (any revision).")
    desired_replicas: int | None = Field(
        default=None, ge=0, description="Replicas largo works toward: spec.replicas within the bounds."
    )
    ready_replicas: int | None = Field(default=None, ge=0)
    updated_replicas: int | None = Field(default=None, ge=0, description="Groups of the current revision.")
    ready: str | None = Field(default=None, description="ready/desired, for kubectl get.")
    selector: str | None = Field(
        default=None, description="Label selector of the leader pods (for the /scale subresource and HPA)."
    )
    url: str | None = Field(default=None, description="The stable in-cluster address.")
    revision: str | None = Field(default=None, description="The revision replicas are rolled toward.")
    model: ServedModel | None = None
    # Up to replicas + maxSurge live groups, and the retiring ones draining beside them.
    groups: list[GroupStatus] = Field(default_factory=list, max_length=MAX_REPLICAS * 4)
    scaling: list[ScalingDecision] = Field(
        default_factory=list,
        max_length=MAX_SCALING_DECISIONS,
        description="The last scaling decisions, newest last.",
    )


# --- root ------------------------------------------------------------------------------------


class InferenceService(BaseModel):
    """A model served behind one stable address by replica groups of GPU pods."""

    model_config = root_config(MAX_SERVICE_NAME_LENGTH, MSG_SERVICE_NAME_TOO_LONG, MSG_SERVICE_NAME_FORMAT)

    api_version: Literal["largo.dev/v1alpha1"] = "largo.dev/v1alpha1"
    kind: Literal["InferenceService"] = "InferenceService"
    metadata: ObjectMeta
    spec: InferenceServiceSpec
    status: InferenceServiceStatus | None = None

    @model_validator(mode="after")
    def _check_name(self) -> Self:
        check_name(
            self.metadata.name, MAX_SERVICE_NAME_LENGTH, MSG_SERVICE_NAME_TOO_LONG, MSG_SERVICE_NAME_FORMAT
        )
        return self

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> InferenceService:
        """Validates metadata and spec of a kopf body; the status is the operator's own."""
        plain = _plain({"metadata": body.get("metadata") or {}, "spec": body.get("spec") or {}})
        return cls.model_validate(plain)


def check_service_status(status: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``status`` fits InferenceServiceStatus exactly (see ``check_status``)."""
    check_status_of(InferenceServiceStatus, status)


def sanitize_service_status(status: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``status`` without the top-level fields that do not fit InferenceServiceStatus, and their names."""
    return sanitize_status_of(InferenceServiceStatus, status)
