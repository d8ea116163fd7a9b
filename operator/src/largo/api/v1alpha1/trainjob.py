"""TrainJob: a gang of identical pods, one per node, that run one distributed torch job.

These models are the single source of truth for the CRD (see `largo.api.crd`). Every CEL rule
declared here through `json_schema_extra` has a pydantic validator twin raising the same message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from largo.api.v1alpha1.common import (
    DNS_SUBDOMAIN_PATTERN,
    ENV_NAME_PATTERN,
    MAX_JOB_NAME_LENGTH,
    MAX_NUM_NODES,
    NO_PARENT_STEP_RULE,
    Condition,
    ObjectMeta,
    SpecModel,
    StatusModel,
    cel,
    check_name,
    immutable,
    immutable_message,
    is_label_value,
    is_qualified_name,
    root_config,
    stays_inside,
    validations,
)
from largo.sched.quantity import parse_resource

KIND = "TrainJob"
GPU_RESOURCE = "nvidia.com/gpu"
AUTO = "auto"

# Names the runtime contract owns: largo sets PET_* / LARGO_*, torchrun sets the rest per process.
RESERVED_ENV_PREFIXES = ("PET_", "LARGO_")
RESERVED_ENV_NAMES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")

# resource.Quantity's grammar without its minus sign (a request cannot be negative); the API server
# checks it via `pattern`, and `minimum` a bare integer. The exponent is whole, as Kubernetes' parser
# reads it (its grammar's comment allows a decimal one, which it then refuses: 1e1.5).
QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]+))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_WHOLE_RE = re.compile(r"^[0-9]+$")

MSG_NAME_TOO_LONG = (
    f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters: pods are named "
    "<name>-node-<rank> and must fit a 63-character DNS label"
)
MSG_NAME_FORMAT = (
    "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
    "letter) because it also names the job's headless Service"
)
MSG_PROCS_PER_NODE = "spec.procsPerNode must be an integer >= 1 or the string 'auto'"
MSG_GPU_WHOLE = f"spec.resourcesPerNode['{GPU_RESOURCE}'] must be a whole non-negative number"
MSG_RESERVED_ENV = (
    "spec.env: names starting with PET_ or LARGO_ and "
    + ", ".join(RESERVED_ENV_NAMES)
    + " are reserved; largo and torchrun set them"
)
MSG_ENV_VALUE_EXCLUSIVE = "spec.env: value and valueFrom are mutually exclusive"
# Label and annotation keys largo sets on its pods (which of them a pod has says how it is scheduled and
# scraped), volume names it adds: a template's own would override or duplicate them.
RESERVED_KEY_PREFIX = "largo.dev/"
RESERVED_VOLUME_PREFIX = "largo-"
MSG_RESERVED_KEYS = (
    f"spec.podTemplate labels and annotations must not use largo's own keys ({RESERVED_KEY_PREFIX}...)"
)
MSG_RESERVED_VOLUMES = (
    f"spec.podTemplate.volumes must not be named like largo's own ({RESERVED_VOLUME_PREFIX}...)"
)
MSG_SUB_PATH_UP = "spec.checkpoint.subPath must not contain '..' (Kubernetes refuses such a subPath)"
MSG_QUALIFIED_NAME = (
    "an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', starting and "
    "ending with a letter or digit"
)
MSG_LABEL_VALUE = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
MSG_CHECKPOINT_MOUNT = "spec.podTemplate.volumeMounts must not mount over spec.checkpoint.path"
MSG_EXIT_CODE_OVERLAP = (
    "spec.failurePolicy: an exit code may not be in both permanentExitCodes and retryableExitCodes"
)
MSG_TOPOLOGY_KEY_IMMUTABLE = immutable_message("spec.scheduling.topologyKey")
MSG_PARALLELISM_DIVIDES = (
    "spec.parallelism: tensor x pipeline must divide the job's processes, spec.numNodes x "
    "spec.procsPerNode ('auto': the GPUs per node, or 1)"
)

# The job's processes per pod as the API server sees them: procsPerNode, 'auto' resolved as
# largo.manifests.trainjob.resolved_procs_per_node does.
_CEL_GPUS = f"int(string(self.resourcesPerNode['{GPU_RESOURCE}']))"
_CEL_PROCS = (
    f"(type(self.procsPerNode) == string ? ('{GPU_RESOURCE}' in self.resourcesPerNode && "
    f"{_CEL_GPUS} > 0 ? {_CEL_GPUS} : 1) : int(self.procsPerNode))"
)

_CEL_RESERVED_NAMES = "[" + ", ".join(f"'{n}'" for n in RESERVED_ENV_NAMES) + "]"
_CEL_RESERVED_PREFIXES = " && ".join(f"!e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)


class Backend(StrEnum):
    """torch.distributed backend; `auto` picks nccl when the pods get GPUs, else gloo."""

    AUTO = "auto"
    NCCL = "nccl"
    GLOO = "gloo"


class DisruptionPolicy(StrEnum):
    """Whether a gang restart because Kubernetes took a pod away counts against backoffLimit."""

    COUNT = "Count"
    IGNORE = "Ignore"


class Phase(StrEnum):
    QUEUED = "Queued"
    STARTING = "Starting"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # spec.suspend is true and pods are still terminating: their GPUs are not free yet.
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"


class ConditionType(StrEnum):
    PODS_CREATED = "PodsCreated"
    PODS_UP_TO_DATE = "PodsUpToDate"
    PROGRESS_REPORTED = "ProgressReported"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    COMPLETE = "Complete"
    FAILED = "Failed"


class Reason(StrEnum):
    # Queueing and admission (why a job waits: largo.sched.types.WaitReason).
    QUEUED = "Queued"
    ADMITTED = "Admitted"
    # Running.
    PODS_RUNNING = "PodsRunning"
    # A bound pod whose container cannot start (its image cannot be pulled, a Secret it reads is
    # missing): said on Running=False until it starts or the job is changed or deleted.
    PODS_NOT_STARTING = "PodsNotStarting"
    # A node of the running gang is not Ready, not yet for LARGO_NODE_LOST_SECONDS (the reason of
    # Running=True, with when the gang restarts if it stays so); the event when it is Ready again.
    NODE_NOT_READY = "NodeNotReady"
    NODE_READY = "NodeReady"
    # Restarts and failures.
    POD_FAILED = "PodFailed"
    NODE_LOST = "NodeLost"
    BINDING_FAILED = "BindingFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    PERMANENT_EXIT_CODE = "PermanentExitCode"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    START_TIMEOUT = "StartTimeout"
    INVALID_SPEC = "InvalidSpec"
    MALFORMED_STATUS = "MalformedStatus"
    POD_DELETED = "PodDeleted"
    REQUEUED = "Requeued"
    # Creating the gang's objects.
    PODS_CREATED = "PodsCreated"
    CREATE_REFUSED = "CreateRefused"
    NAME_CONFLICT = "NameConflict"
    PREVIOUS_ATTEMPT_TERMINATING = "PreviousAttemptTerminating"
    # Spec edits while the job runs.
    SPEC_CHANGED = "SpecChanged"
    PODS_UP_TO_DATE = "PodsUpToDate"
    # Progress reports from the training runtime.
    PROGRESS_ACCEPTED = "ProgressAccepted"
    INVALID_PROGRESS = "InvalidProgressReport"
    # Lifecycle.
    TTL_EXPIRED = "TTLExpired"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    SUCCEEDED = "Succeeded"


# --- spec ------------------------------------------------------------------------------------

Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

ProcsPerNode = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]

ExitCode = Annotated[int, Field(ge=0, le=255)]

INT64_MAX = 2**63 - 1

FreeForm = dict[str, Any]


class EnvVar(SpecModel):
    """An environment variable for the trainer container (same shape as core/v1 EnvVar)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.value) || !has(self.valueFrom)", MSG_ENV_VALUE_EXCLUSIVE)
        )
    )

    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN)
    value: str | None = None
    value_from: FreeForm | None = Field(
        default=None, description="A core/v1 EnvVarSource, passed through to the pod unchanged."
    )

    @model_validator(mode="after")
    def _value_xor_value_from(self) -> Self:
        if self.value is not None and self.value_from is not None:
            raise ValueError(MSG_ENV_VALUE_EXCLUSIVE)
        return self


class Checkpoint(SpecModel):
    """A PersistentVolumeClaim every pod mounts; its path is handed over as LARGO_CHECKPOINT_DIR."""

    claim_name: str = Field(min_length=1, max_length=253, description="Name of the PVC to mount.")
    path: str = Field(
        default="/checkpoints",
        min_length=1,
        max_length=4096,
        pattern=r"^/",
        description="Absolute directory in the container where the claim is mounted.",
    )
    sub_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=r"^[^/]",
        description="Relative directory inside the claim to mount instead of its root (no '..').",
        json_schema_extra=validations(cel(NO_PARENT_STEP_RULE, MSG_SUB_PATH_UP)),
    )

    @field_validator("sub_path")
    @classmethod
    def _stays_inside(cls, value: str | None) -> str | None:
        return stays_inside(value, MSG_SUB_PATH_UP)


class FailurePolicy(SpecModel):
    """How a failed gang is handled: every restart recreates all pods of the gang."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.permanentExitCodes) || !has(self.retryableExitCodes) || "
                "!self.permanentExitCodes.exists(c, c in self.retryableExitCodes)",
                MSG_EXIT_CODE_OVERLAP,
                field_path=".retryableExitCodes",
            )
        )
    )

    backoff_limit: int = Field(
        default=3, ge=0, le=10000, description="Gang restarts allowed before the job fails."
    )
    permanent_exit_codes: list[ExitCode] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Exit codes that fail the job at once, without a restart.",
    )
    retryable_exit_codes: list[ExitCode] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Exit codes that trigger a restart; empty means every non-permanent code.",
    )
    disruptions: DisruptionPolicy = Field(
        default=DisruptionPolicy.COUNT,
        description="Whether a gang restart because Kubernetes took a pod away (a drain's eviction, a "
        "preemption, a deleted pod, a lost node), not because the job failed, counts against "
        "backoffLimit: Count (as a Job's does) or Ignore (a Job's podFailurePolicy ignoring "
        "DisruptionTarget). Either way such restarts are counted in status.disruptions and back off as "
        "any restart does.",
    )
    start_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=7 * 24 * 3600,
        description="Seconds an admitted gang may take for every pod to run (an image pull, a volume "
        "attach); past it the gang restarts, counted against backoffLimit, so a job whose pods cannot "
        "start gives its GPUs back and fails. Unset: it waits.",
    )

    @model_validator(mode="after")
    def _disjoint_codes(self) -> Self:
        for field, codes in (
            ("permanentExitCodes", self.permanent_exit_codes),
            ("retryableExitCodes", self.retryable_exit_codes),
        ):
            if len(set(codes)) != len(codes):
                raise ValueError(f"spec.failurePolicy.{field} must not contain duplicates")
        if set(self.permanent_exit_codes) & set(self.retryable_exit_codes):
            raise ValueError(MSG_EXIT_CODE_OVERLAP)
        return self


class Scheduling(SpecModel):
    """Gang admission: queue, priority and topology constraints."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.topologyKey) == has(oldSelf.topologyKey) && "
                "(!has(self.topologyKey) || self.topologyKey == oldSelf.topologyKey)",
                MSG_TOPOLOGY_KEY_IMMUTABLE,
                field_path=".topologyKey",
            )
        )
    )

    priority: int = Field(
        default=0,
        ge=-(2**31),
        le=2**31 - 1,
        description="Higher is admitted first: largo admits every job and replica group of the cluster "
        "in one order (priority, then arrival), whatever its queue; not pod priority.",
    )
    queue: str = Field(
        default="default",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A name to group jobs by in the metrics (largo_queue_length, largo_queue_gpus) and "
        "alerts; it does not split the admission order, which is one for the cluster.",
    )
    topology_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=317,
        description="Node label key; every pod of the gang lands on nodes sharing one value of it.",
    )
    preferred_topology_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=317,
        description="Node label key the gang preferably stays within one value of.",
    )
    scheduler_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="schedulerName for the pods; the cluster default scheduler when unset.",
    )
    exclusive_nodes: bool = Field(
        default=False,
        description="Give each pod a node of its own: only nodes with no GPU in use are chosen, one pod "
        "each, and largo places nothing else there while the pod holds it (pods outside largo are not "
        "stopped: taint the nodes for that). Without it, pods are packed: several share a node with room.",
    )


class Parallelism(SpecModel):
    """How each model replica is split over the job's processes; the rest is data parallelism. Ranks
    fill a (pipeline, data, tensor) mesh with tensor fastest, so a tensor-parallel group stays within a
    pod when tensor divides procsPerNode, and each pipeline stage is a run of consecutive ranks
    (docs/runtime.md). Handed to every process as LARGO_TENSOR_PARALLEL and LARGO_PIPELINE_PARALLEL."""

    tensor: int = Field(
        default=1, ge=1, le=1024, description="Processes each layer's matrices are split over (by heads)."
    )
    pipeline: int = Field(default=1, ge=1, le=1024, description="Stages the layers are split into.")


class LocalObjectReference(SpecModel):
    """An object of the same namespace, by name (core/v1 LocalObjectReference)."""

    name: str = Field(min_length=1, max_length=253)


class PodTemplate(SpecModel):
    """Pod-level settings passed through to every pod of the gang."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[FreeForm] = Field(default_factory=list, description="core/v1 Tolerations.")
    volumes: list[FreeForm] = Field(default_factory=list, description="core/v1 Volumes.")
    volume_mounts: list[FreeForm] = Field(
        default_factory=list, description="core/v1 VolumeMounts of the trainer container."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra=validations(
            cel(f"self.all(k, !k.startsWith('{RESERVED_KEY_PREFIX}'))", MSG_RESERVED_KEYS)
        ),
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra=validations(
            cel(f"self.all(k, !k.startsWith('{RESERVED_KEY_PREFIX}'))", MSG_RESERVED_KEYS)
        ),
    )
    service_account_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN
    )
    # None rather than an empty list when unset: the pods' spec hash of an object written before the
    # field existed stays the same, so an operator upgrade restarts no job and rolls no service.
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None,
        max_length=64,
        description="Secrets of the pods' namespace to pull the images with (a private registry's); an "
        "InferenceService's router pods use them too.",
    )
    security_context: FreeForm | None = Field(default=None, description="core/v1 PodSecurityContext.")
    container_security_context: FreeForm | None = Field(
        default=None,
        description="core/v1 SecurityContext of the trainer (or model server) container: what a "
        "namespace enforcing the restricted PodSecurity standard asks (allowPrivilegeEscalation false, "
        "capabilities.drop [ALL]). Unset: the container runs as its image made it (RDMA needs "
        "IPC_LOCK, for one).",
    )
    priority_class_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN
    )
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="Seconds between SIGTERM and SIGKILL when a pod is stopped: time to write a checkpoint.",
    )

    def mounts_over(self, path: str) -> bool:
        """Whether a mount of the template is at ``path`` (a trailing '/' aside), where largo mounts."""
        return any(str(m.get("mountPath", "")).rstrip("/") == path.rstrip("/") for m in self.volume_mounts)

    @field_validator("labels", "annotations")
    @classmethod
    def _kubernetes_keys(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        field = f"spec.podTemplate.{info.field_name}"
        for key, text in value.items():
            # Kubernetes checks an annotation's key in lower case: `Example.com/owner` is one.
            if not is_qualified_name(key if info.field_name == "labels" else key.lower()):
                raise ValueError(f"{field}: '{key}' is not a valid key: {MSG_QUALIFIED_NAME}")
            if info.field_name == "labels" and not is_label_value(text):
                raise ValueError(f"{field}['{key}']: '{text}' is not a valid label value: {MSG_LABEL_VALUE}")
        return value

    @model_validator(mode="after")
    def _none_of_largo_s_own(self) -> Self:
        # Refused here, and so by the operator as InvalidSpec: the volumes are free-form to the API
        # server. Accepted, their pods were refused at every attempt, or a user's label made a packed
        # gang's pods look exclusive to the scheduler.
        if any(key.startswith(RESERVED_KEY_PREFIX) for key in (*self.labels, *self.annotations)):
            raise ValueError(MSG_RESERVED_KEYS)
        if any(str(volume.get("name", "")).startswith(RESERVED_VOLUME_PREFIX) for volume in self.volumes):
            raise ValueError(MSG_RESERVED_VOLUMES)
        return self


class TrainJobSpec(SpecModel):
    """Desired state of a TrainJob."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.parallelism) || "
                f"(self.numNodes * {_CEL_PROCS}) % "
                "((has(self.parallelism.tensor) ? self.parallelism.tensor : 1) * "
                "(has(self.parallelism.pipeline) ? self.parallelism.pipeline : 1)) == 0",
                MSG_PARALLELISM_DIVIDES,
                field_path=".parallelism",
            )
        )
    )

    image: str = Field(
        min_length=1,
        max_length=4096,
        json_schema_extra=validations(immutable("spec.image")),
        description="Container image of the trainer.",
    )
    command: list[str] | None = Field(default=None, max_length=1024)
    args: list[str] | None = Field(default=None, max_length=4096)
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
        description="Extra environment for the trainer; the rendezvous variables are reserved.",
    )
    num_nodes: int = Field(
        default=1,
        ge=1,
        le=MAX_NUM_NODES,
        json_schema_extra=validations(immutable("spec.numNodes")),
        description="Number of pods in the gang. Pods share a node when it has room for several "
        "(packing keeps whole nodes free); scheduling.exclusiveNodes gives each its own.",
    )
    procs_per_node: ProcsPerNode = Field(
        default=AUTO,
        json_schema_extra=validations(
            cel("type(self) == string ? self == 'auto' : self >= 1", MSG_PROCS_PER_NODE),
            immutable("spec.procsPerNode"),
        ),
        description="Worker processes per pod; 'auto' means one per GPU (one without GPUs).",
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
                ),
                immutable("spec.resourcesPerNode"),
            ),
        },
        description="Requests (and equal limits) of each pod, e.g. nvidia.com/gpu: 8.",
    )
    backend: Backend = Field(
        default=Backend.AUTO,
        json_schema_extra=validations(immutable("spec.backend")),
        description="torch.distributed backend; auto is nccl with GPUs, else gloo.",
    )
    parallelism: Parallelism = Field(
        default_factory=Parallelism,
        json_schema_extra={"default": {}, **validations(immutable("spec.parallelism"))},
        description="Tensor and pipeline parallelism of each model replica (the reference trainer's "
        "--tp and --pp); 1 and 1 is plain data parallelism.",
    )
    checkpoint: Checkpoint | None = None
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, json_schema_extra={"default": {}})
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job once it has run this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished job after this many seconds."
    )
    suspend: bool = Field(default=False, description="Delete the pods and hold the job in its queue.")
    scheduling: Scheduling = Field(default_factory=Scheduling, json_schema_extra={"default": {}})
    pod_template: PodTemplate = Field(default_factory=PodTemplate)

    @field_validator("resources_per_node", mode="before")
    @classmethod
    def _fractional_gpus(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and isinstance(value.get(GPU_RESOURCE), float):
            raise ValueError(MSG_GPU_WHOLE)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if isinstance(self.procs_per_node, str) and self.procs_per_node != AUTO:
            raise ValueError(MSG_PROCS_PER_NODE)
        if isinstance(self.procs_per_node, int) and self.procs_per_node < 1:
            raise ValueError(MSG_PROCS_PER_NODE)
        check_resources(self.resources_per_node)
        gpus = self.resources_per_node.get(GPU_RESOURCE)
        if len(self.resources_per_node) > 32:
            raise ValueError("spec.resourcesPerNode may list at most 32 resources")
        procs = self.procs_per_node if isinstance(self.procs_per_node, int) else max(int(str(gpus or 0)), 1)
        if (self.num_nodes * procs) % (self.parallelism.tensor * self.parallelism.pipeline):
            raise ValueError(MSG_PARALLELISM_DIVIDES)
        names = [e.name for e in self.env]
        if any(is_reserved_env_name(n) for n in names):
            raise ValueError(MSG_RESERVED_ENV)
        if len(set(names)) != len(names):
            raise ValueError("spec.env: names must be unique")
        if self.checkpoint is not None and self.pod_template.mounts_over(self.checkpoint.path):
            raise ValueError(MSG_CHECKPOINT_MOUNT)
        return self


def check_resources(resources: Mapping[str, int | str]) -> None:
    """ValueError naming the first quantity of ``resourcesPerNode`` the scheduler could not count: not a
    quantity, negative, beyond Kubernetes' int64 once scaled (``10E`` of cpu is 10^22 millicores), or
    a fraction of a GPU. Refused here, the object gets a condition saying so; let through, it would
    fail every scheduling pass that reads it."""
    gpus = resources.get(GPU_RESOURCE)
    if gpus is not None and not _WHOLE_RE.match(str(gpus)):
        raise ValueError(MSG_GPU_WHOLE)
    for resource, quantity in resources.items():
        if not is_qualified_name(resource):
            raise ValueError(
                f"spec.resourcesPerNode: '{resource}' is not a resource name: {MSG_QUALIFIED_NAME}"
            )
        if isinstance(quantity, str) and not _QUANTITY_RE.match(quantity):
            raise ValueError(f"spec.resourcesPerNode['{resource}'] is not a valid quantity")
        try:
            parse_resource(resource, quantity)
        except ValueError as error:
            raise ValueError(f"spec.resourcesPerNode['{resource}']: {error}") from None


def is_reserved_env_name(name: str) -> bool:
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


# --- status ----------------------------------------------------------------------------------


class PodCounts(StatusModel):
    pending: int = Field(default=0, ge=0)
    running: int = Field(default=0, ge=0)
    succeeded: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)


class QueueStatus(StatusModel):
    """Why and where the job waits, while it is not admitted."""

    name: str | None = None
    position: int | None = Field(
        default=None,
        ge=1,
        description="Place in the admission order, 1 is the head; absent for a job that blocks nobody: "
        "one that can never fit, or one waiting for another job's checkpoint directory.",
    )
    reason: str | None = None
    message: str | None = None


class Placement(StatusModel):
    """Where the admitted gang runs: nodes[i] hosts the pod of rank i."""

    attempt: int | None = Field(default=None, ge=0, description="The gang attempt this placement is for.")
    nodes: list[str] = Field(default_factory=list)
    admitted_at: datetime | None = None
    spec_hash: str | None = Field(
        default=None,
        description="Hash of the spec this attempt's pods are built from (their largo.dev/spec-hash).",
    )
    creating_since: datetime | None = Field(
        default=None,
        description="When this attempt's pods could first be created (the earlier attempt's gone): "
        "startTimeoutSeconds counts from then.",
    )
    succeeded_ranks: list[int] = Field(
        default_factory=list,
        max_length=1024,
        description="Ranks of this attempt seen ended 0 on their own: one whose pod is gone after that "
        "(Kubernetes deletes a finished pod at once, a drain's eviction too) is done, not lost.",
    )


class ProgressReport(StatusModel):
    """What rank 0 reports into the job's progress ConfigMap (docs/runtime.md). The operator validates
    it with this model and copies it into ``status.progress``; anything else is refused with a reason."""

    step: int = Field(ge=0, description="Optimizer steps done.")
    total_steps: int = Field(ge=0, description="Steps the run will take.")
    percent: float = Field(ge=0, le=100, allow_inf_nan=False)
    loss: float | None = Field(default=None, allow_inf_nan=False, description="Loss of the last step.")
    tokens_per_second: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds to the end.")
    updated_at: datetime = Field(description="When the runtime measured this report.")
    summary: str = Field(default="", max_length=200, description="Shown in the PROGRESS column.")
    checkpoint_step: int | None = Field(default=None, ge=0, description="Step of the newest checkpoint.")
    checkpointed_at: datetime | None = Field(
        default=None, description="When the newest complete checkpoint was written."
    )

    @field_validator("step", "total_steps", "eta_seconds", "checkpoint_step")
    @classmethod
    def _int64(cls, value: int | None) -> int | None:
        # Counts are int64 in the API server: a larger one would fail every status write that carried
        # it. Checked here, not as the schema's maximum (which the API server reads as a float).
        if value is not None and value > INT64_MAX:
            raise ValueError(f"must be at most {INT64_MAX}")
        return value


class Progress(ProgressReport):
    """The last accepted progress report; ``stale`` once reports stop while the job runs."""

    stale: bool = Field(default=False, description="True when the runtime stopped reporting.")


class TrainJobStatus(StatusModel):
    """Observed state; written by the operator only."""

    phase: Phase | None = None
    reason: str | None = Field(
        default=None,
        description="Why the job is in its phase now, from its conditions (kubectl get -o wide).",
    )
    message: str | None = Field(default=None, description="The same, for people.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    nodes: str | None = Field(
        default=None, description="Running pods of the current attempt / numNodes, e.g. 2/2."
    )
    gpus: int | None = Field(default=None, ge=0, description="GPUs of the whole gang.")
    pod_counts: PodCounts | None = None
    restarts: int | None = Field(default=None, ge=0, description="Gang restarts so far.")
    disruptions: int | None = Field(
        default=None,
        ge=0,
        description="Of the restarts, those because Kubernetes took a pod away (not counted against "
        "backoffLimit with failurePolicy.disruptions Ignore).",
    )
    attempt: int | None = Field(
        default=None,
        ge=0,
        description="Generation of the current gang; its pods carry it as the largo.dev/attempt label.",
    )
    start_time: datetime | None = None
    completion_time: datetime | None = None
    last_restart_time: datetime | None = None
    next_restart_time: datetime | None = Field(
        default=None, description="When a gang waiting out its restart backoff is recreated."
    )
    releases: int | None = Field(
        default=None,
        ge=0,
        description="Gangs released in a row since the job last ran because their pods could not be "
        "created or bound (not counted as restarts); each waits longer before its next admission.",
    )
    next_admission_time: datetime | None = Field(
        default=None, description="When a released gang may be admitted again (its backoff)."
    )
    queue: QueueStatus | None = None
    placement: Placement | None = None
    checkpoint_directory: str | None = Field(
        default=None,
        min_length=1,
        description="The checkpoint directory (`claim` or `claim/subPath`) the gang was last admitted "
        "with: no other job of the namespace that writes it is admitted until this one has finished or "
        "been suspended and its pods are gone.",
    )
    progress: Progress | None = Field(
        default=None,
        description="The runtime's last accepted progress report (copied by the operator from the "
        "job's progress ConfigMap); `summary` is shown by kubectl get.",
    )


def check_status(status: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``status`` is a TrainJobStatus: right types, and no field the model (so
    the CRD and the docs generated from it) does not have. Every status the operator writes passes
    through it, so the writer cannot drift from the schema."""
    check_status_of(TrainJobStatus, status)


def sanitize_status(status: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``status`` without the top-level fields that do not fit TrainJobStatus (written by hand, or by an
    older operator), and their names: what the operator carries over must pass ``check_status``.
    Fields inside a known one that this version does not know (a newer operator's, seen after a
    rollback) are left out of it, not the reason to drop it: a placement or a replica group stays."""
    return sanitize_status_of(TrainJobStatus, status)


def check_status_of(model: type[BaseModel], status: Mapping[str, Any]) -> None:
    """``check_status`` for any kind's status model."""
    try:
        known = model.model_validate(_plain(status)).model_dump(mode="json", by_alias=True)
    except ValidationError as error:
        raise ValueError(f"status does not fit {model.__name__}: {error}") from error
    unknown = list(_unknown_fields(_plain(status), known, "status"))
    if unknown:
        raise ValueError(f"status fields missing from {model.__name__}: {', '.join(unknown)}")


def sanitize_status_of(model: type[BaseModel], status: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``sanitize_status`` for any kind's status model."""
    clean: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in status.items():
        given = _plain({key: value})
        try:
            known = model.model_validate(given).model_dump(mode="json", by_alias=True)
        except ValidationError:
            dropped.append(key)
            continue
        if key not in known:
            dropped.append(key)
        else:
            clean[key] = _known_part(given[key], known[key])
    return clean, dropped


def _known_part(given: Any, known: Any) -> Any:
    """``given`` without the object keys that ``known`` (its validated dump) does not have."""
    if isinstance(given, dict) and isinstance(known, dict):
        return {key: _known_part(value, known[key]) for key, value in given.items() if key in known}
    if isinstance(given, list) and isinstance(known, list):
        return [_known_part(value, model) for value, model in zip(given, known, strict=False)]
    return given


def _unknown_fields(given: Any, known: Any, path: str) -> Iterable[str]:
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                yield f"{path}.{key}"
            else:
                yield from _unknown_fields(value, known[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for index, (value, model) in enumerate(zip(given, known, strict=False)):
            yield from _unknown_fields(value, model, f"{path}[{index}]")


# --- root ------------------------------------------------------------------------------------


class TrainJob(BaseModel):
    """A distributed torch training job."""

    model_config = root_config(MAX_JOB_NAME_LENGTH, MSG_NAME_TOO_LONG, MSG_NAME_FORMAT)

    api_version: Literal["largo.dev/v1alpha1"] = "largo.dev/v1alpha1"
    kind: Literal["TrainJob"] = "TrainJob"
    metadata: ObjectMeta
    spec: TrainJobSpec
    status: TrainJobStatus | None = None

    @model_validator(mode="after")
    def _check_name(self) -> Self:
        check_name(self.metadata.name, MAX_JOB_NAME_LENGTH, MSG_NAME_TOO_LONG, MSG_NAME_FORMAT)
        return self

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TrainJob:
        """Validate a kopf body (or any mapping view of the object)."""
        return cls.model_validate(_plain(body))

    def to_body(self) -> dict[str, Any]:
        """The object as Kubernetes JSON, camelCase, without unset optionals."""
        body: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return body


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def validation_messages(exc: ValidationError) -> list[str]:
    """Flatten a pydantic error into one line per problem, for an InvalidSpec condition."""
    out: list[str] = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        out.append(msg if msg.startswith(("spec", "metadata")) or not loc else f"{loc}: {msg}")
    return out
