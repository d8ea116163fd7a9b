"""The operator's settings, from its environment (``LARGO_*``; the chart sets them from ``operator.*``).

Read and checked once, before kopf starts: a value that cannot work (a non-number, zero reconcile
workers, a zero autoscaling period that would spin, a cap below its base, leader-election timings a
standby could not honour) stops ``largo operator`` with one line per bad variable and exit code 2,
instead of a traceback from inside kopf's start-up or an operator that runs and does nothing.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from largo.controllers.leader import ElectionTimings
from largo.manifests.inferenceservice import DEFAULT_SERVER_IMAGE
from largo.manifests.router import DEFAULT_ROUTER_IMAGE
from largo.policy.trainjob import Timings

ENV_PREFIX = "LARGO_"
# Ten million seconds (about four months): no delay or timeout is meant to be longer, and one near
# float's range would overflow the timestamps the lifecycle writes.
_LONGEST = 10_000_000


def _whole(value: object) -> object:
    """Helm writes a large number as ``1e+06``: a whole number however written is an integer."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    return value


# A count or whole seconds, from a variable.
Whole = Annotated[int, BeforeValidator(_whole)]


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True, allow_inf_nan=False
    )

    restart_backoff_seconds: float = Field(default=10.0, gt=0, le=_LONGEST)
    restart_backoff_max_seconds: float = Field(default=300.0, gt=0, le=_LONGEST)
    binding_timeout_seconds: float = Field(default=30.0, gt=0, le=_LONGEST)
    progress_stale_seconds: float = Field(default=120.0, gt=0, le=_LONGEST)
    # 0: a node is lost as soon as it is not Ready (the behaviour before this setting existed).
    node_lost_seconds: float = Field(default=60.0, ge=0, le=_LONGEST)
    reconcile_workers: Whole = Field(default=8, ge=1, le=64)
    server_image: str = Field(default=DEFAULT_SERVER_IMAGE, min_length=1)
    router_image: str = Field(default=DEFAULT_ROUTER_IMAGE, min_length=1)
    retry_base_seconds: float = Field(default=0.05, gt=0, le=_LONGEST)
    retry_max_seconds: float = Field(default=60.0, gt=0, le=_LONGEST)
    lease_duration_seconds: Whole = Field(default=10, ge=1, le=_LONGEST)
    renew_deadline_seconds: Whole = Field(default=6, ge=1, le=_LONGEST)
    retry_period_seconds: Whole = Field(default=1, ge=1, le=_LONGEST)
    # Each period scrapes every autoscaled service's replicas: under 0.1 s it would only burn CPU.
    autoscale_period_seconds: float = Field(default=2.0, ge=0.1, le=3600)
    watch_inactivity_seconds: float = Field(default=70.0, gt=0, le=_LONGEST)
    # 0: no /metrics (``--metrics-port`` sets it).
    metrics_port: Whole = Field(default=0, ge=0, le=65535)
    # "<namespace>/<lease name>" when the operator runs for leader election (``--leader-elect`` sets it).
    leader_election: str | None = Field(default=None, pattern=r"^[^/]+/[^/]+$")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.restart_backoff_max_seconds < self.restart_backoff_seconds:
            raise ValueError(
                f"{ENV_PREFIX}RESTART_BACKOFF_MAX_SECONDS ({self.restart_backoff_max_seconds:g}) is below "
                f"{ENV_PREFIX}RESTART_BACKOFF_SECONDS ({self.restart_backoff_seconds:g})"
            )
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError(
                f"{ENV_PREFIX}RETRY_MAX_SECONDS ({self.retry_max_seconds:g}) is below "
                f"{ENV_PREFIX}RETRY_BASE_SECONDS ({self.retry_base_seconds:g})"
            )
        self.election_timings()
        return self

    def election_timings(self) -> ElectionTimings:
        try:
            return ElectionTimings(
                lease_duration=self.lease_duration_seconds,
                renew_deadline=self.renew_deadline_seconds,
                retry_period=self.retry_period_seconds,
            )
        except ValueError as error:
            raise ValueError(
                f"{error} ({ENV_PREFIX}RETRY_PERIOD_SECONDS {self.retry_period_seconds}, "
                f"{ENV_PREFIX}RENEW_DEADLINE_SECONDS {self.renew_deadline_seconds}, "
                f"{ENV_PREFIX}LEASE_DURATION_SECONDS {self.lease_duration_seconds})"
            ) from None

    def timings(self) -> Timings:
        return Timings(
            base=self.restart_backoff_seconds,
            cap=self.restart_backoff_max_seconds,
            binding_timeout=self.binding_timeout_seconds,
            progress_stale_after=self.progress_stale_seconds,
            node_lost_after=self.node_lost_seconds,
        )


def describe(error: ValidationError) -> list[str]:
    """One line per refused value, naming the variable as it is set, with the value it had."""
    lines = []
    for problem in error.errors(include_url=False):
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if field:
            lines.append(f"{ENV_PREFIX}{field.upper()}={str(problem['input'])!r}: {message}")
        else:
            lines.append(message)
    return lines
