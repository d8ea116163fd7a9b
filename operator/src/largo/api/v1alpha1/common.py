"""Shared API building blocks: base models, conditions and the declarative CEL rule helper.

The same message strings feed both the CRD's `x-kubernetes-validations` and the pydantic
validators, so an object that bypasses the API server's schema fails with the same text.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "largo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "trainjobs"
SINGULAR = "trainjob"

# Pods are named `<job>-node-<rank>` and must fit a 63-character DNS label; ranks go up to 1023
# (numNodes <= 1024), so 50 + len("-node-") + 4 digits = 60 leaves headroom.
MAX_JOB_NAME_LENGTH = 50
MAX_NUM_NODES = 1024
# The job name also names the headless Service, which must be an RFC 1035 label.
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


# Ports every pod of largo's declares: the rendezvous (torch.distributed's store) and the metrics page.
MASTER_PORT = 29500
METRICS_PORT = 9400
# Where a model server's pods mount the model (an InferenceService's podTemplate must not mount there).
MODEL_MOUNT = "/model"
# Ray's head port, on which the vllm preset's leader starts Ray for a replica of several pods.
RAY_PORT = 6379


# Kubernetes' own formats for what largo passes through to its pods, checked here so that a spec the
# pods would be refused for is refused itself (the API server's message, not a pod creation loop).
# A DNS-1123 subdomain: a service account's or a priority class's name, a label key's prefix.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label value (empty, or at most 63 of these), and a qualified name's name part (1..63).
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# An environment variable's name as every supported Kubernetes takes it: printable ASCII without '='
# (1.34 and later; earlier ones are stricter still: letters, digits, '_', '-' and '.').
ENV_NAME_PATTERN = r"^[ -<>-~]+$"
_DNS_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)


def is_qualified_name(key: str) -> bool:
    """A label key's or a resource name's format: an optional DNS-subdomain prefix and '/', then a
    name of 1..63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit."""
    prefix, _, name = key.rpartition("/")
    # fullmatch: re's `$` also matches before a final newline, which Kubernetes refuses.
    if "/" in key and not (0 < len(prefix) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_VALUE_RE.fullmatch(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE_RE.fullmatch(value))


# A relative path that stays inside its volume (a subPath: Kubernetes refuses one with '..'), for CEL.
NO_PARENT_STEP_RULE = r"!self.matches('(^|/)\\.\\.(/|$)')"


def stays_inside(value: str | None, message: str) -> str | None:
    """``value``, or ValueError(``message``) for a path with a '..' step (``NO_PARENT_STEP_RULE``)."""
    if value is not None and ".." in value.split("/"):
        raise ValueError(message)
    return value


def cel(
    rule: str, message: str, *, reason: str | None = None, field_path: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry; every rule carries a message naming its field, and a rule
    placed on an enclosing object (to see several fields, or an optional one) a ``fieldPath`` relative
    to it, so the API server's error names the field instead of the object."""
    entry = {"rule": rule, "message": message}
    if reason is not None:
        entry["reason"] = reason
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """A `json_schema_extra` fragment attaching CEL rules to a field or model schema."""
    return {"x-kubernetes-validations": list(rules)}


def root_config(max_name_length: int, too_long: str, bad_format: str) -> ConfigDict:
    """A kind's root model config: camelCase, status and unknown top-level fields ignored, and the CEL
    rules on metadata.name (length, DNS-1035 format) that its pods' and Services' names rely on."""
    return ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        json_schema_extra=validations(
            cel(f"self.metadata.name.size() <= {max_name_length}", too_long, field_path=".metadata.name"),
            cel(f"self.metadata.name.matches('{JOB_NAME_PATTERN}')", bad_format, field_path=".metadata.name"),
        ),
    )


def check_name(name: str, max_name_length: int, too_long: str, bad_format: str) -> None:
    """The pydantic twin of ``root_config``'s rules."""
    if len(name) > max_name_length:
        raise ValueError(too_long)
    if not re.match(JOB_NAME_PATTERN, name):
        raise ValueError(bad_format)


def immutable(field_path: str) -> dict[str, str]:
    """A transition rule that rejects any change of the field after creation."""
    return cel("self == oldSelf", immutable_message(field_path))


def immutable_message(field_path: str) -> str:
    return f"{field_path} is immutable"


class SpecModel(BaseModel):
    """Base for user-written objects: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
    )


class StatusModel(BaseModel):
    """Base for operator-written objects: tolerate fields written by a newer operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """A Kubernetes-style condition (same shape as metav1.Condition)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Admitted or Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="CamelCase machine-readable reason."
    )
    message: str | None = Field(default=None, max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; everything else is kept as-is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
