"""The operator's settings: the documented defaults, and values that cannot work refused before start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from largo.controllers.settings import OperatorSettings, describe
from largo.policy.trainjob import Timings
from pydantic import ValidationError


@pytest.fixture(autouse=True)
def _no_settings_from_this_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LARGO_"):
            monkeypatch.delenv(name)


def _refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        OperatorSettings()
    return describe(refused.value)


def test_defaults_are_the_documented_ones() -> None:
    settings = OperatorSettings()
    assert settings.timings() == Timings(
        base=10.0, cap=300.0, binding_timeout=30.0, progress_stale_after=120.0, node_lost_after=60.0
    )
    assert (settings.reconcile_workers, settings.autoscale_period_seconds) == (8, 2.0)
    assert (settings.retry_base_seconds, settings.retry_max_seconds) == (0.05, 60.0)
    timings = settings.election_timings()
    assert (timings.lease_duration, timings.renew_deadline, timings.retry_period) == (10, 6, 1)
    assert (settings.server_image, settings.router_image) == ("largo-trainer:dev", "largo-router:dev")
    assert (settings.metrics_port, settings.leader_election) == (0, None)


def test_values_are_read_from_the_environment_and_empty_ones_keep_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LARGO_BINDING_TIMEOUT_SECONDS", "12.5")
    monkeypatch.setenv("LARGO_RECONCILE_WORKERS", "3")
    monkeypatch.setenv("LARGO_NODE_LOST_SECONDS", "0")  # 0: lost as soon as it is not Ready
    monkeypatch.setenv("LARGO_SERVER_IMAGE", "registry.example/largo-trainer:1.0")
    monkeypatch.setenv("LARGO_ROUTER_IMAGE", "")
    settings = OperatorSettings()
    assert settings.timings().binding_timeout == 12.5
    assert settings.reconcile_workers == 3
    assert settings.timings().node_lost_after == 0
    assert settings.server_image == "registry.example/largo-trainer:1.0"
    assert settings.router_image == "largo-router:dev"


def test_a_whole_number_however_helm_writes_it_is_an_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGO_LEASE_DURATION_SECONDS", "1e+06")
    monkeypatch.setenv("LARGO_RECONCILE_WORKERS", "8.0")
    settings = OperatorSettings()
    assert (settings.lease_duration_seconds, settings.reconcile_workers) == (1_000_000, 8)


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGO_METRICS_PORT", "9000")
    assert OperatorSettings(metrics_port=8080).metrics_port == 8080


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LARGO_RECONCILE_WORKERS", "0", "greater than or equal to 1"),
        ("LARGO_RECONCILE_WORKERS", "65", "less than or equal to 64"),
        ("LARGO_AUTOSCALE_PERIOD_SECONDS", "0", "greater than or equal to 0.1"),
        ("LARGO_BINDING_TIMEOUT_SECONDS", "-1", "greater than 0"),
        ("LARGO_NODE_LOST_SECONDS", "-1", "greater than or equal to 0"),
        ("LARGO_BINDING_TIMEOUT_SECONDS", "30s", "valid number"),
        ("LARGO_LEASE_DURATION_SECONDS", "12.5", "valid integer"),
        # A delay near float's range overflows the timestamps the lifecycle writes.
        ("LARGO_RESTART_BACKOFF_MAX_SECONDS", "inf", "finite number"),
        ("LARGO_BINDING_TIMEOUT_SECONDS", "1e+12", "less than or equal to 10000000"),
        ("LARGO_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("LARGO_LEADER_ELECTION", "no-namespace", "should match pattern"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    [line] = _refusal(monkeypatch, **{name: value})
    assert line.startswith(f"{name}={value!r}: ")
    assert says in line


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _refusal(monkeypatch, LARGO_RECONCILE_WORKERS="0", LARGO_WATCH_INACTIVITY_SECONDS="never")
    named = [line.split("=")[0] for line in lines]
    assert named == ["LARGO_RECONCILE_WORKERS", "LARGO_WATCH_INACTIVITY_SECONDS"]


def test_a_cap_below_its_base_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _refusal(monkeypatch, LARGO_RESTART_BACKOFF_SECONDS="60", LARGO_RESTART_BACKOFF_MAX_SECONDS="30")
    assert lines == ["LARGO_RESTART_BACKOFF_MAX_SECONDS (30) is below LARGO_RESTART_BACKOFF_SECONDS (60)"]
    monkeypatch.delenv("LARGO_RESTART_BACKOFF_MAX_SECONDS")
    assert _refusal(monkeypatch, LARGO_RETRY_MAX_SECONDS="0.01") == [
        "LARGO_RETRY_MAX_SECONDS (0.01) is below LARGO_RETRY_BASE_SECONDS (0.05)"
    ]


def test_election_timings_a_standby_could_not_honour_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    [line] = _refusal(monkeypatch, LARGO_LEASE_DURATION_SECONDS="6")
    assert "retry_period + renew_deadline < lease_duration" in line
    assert "LARGO_LEASE_DURATION_SECONDS 6" in line
    # A deposed leader's last write, begun at its renew deadline and slow to connect, would land after
    # the standby took the Lease: client-go's rule alone (1 + 8 < 10) let it.
    [line] = _refusal(monkeypatch, LARGO_LEASE_DURATION_SECONDS="10", LARGO_RENEW_DEADLINE_SECONDS="8")
    assert "renew_deadline + 2 (a write's connect timeout) < lease_duration" in line


def test_largo_operator_stops_before_kopf_with_the_reasons() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("LARGO_")}
    # No cluster: the operator must stop on its settings before it looks for one.
    env |= {"KUBECONFIG": "/nonexistent", "LARGO_RECONCILE_WORKERS": "0"}
    env["LARGO_AUTOSCALE_PERIOD_SECONDS"] = "0"
    run = subprocess.run(
        [sys.executable, "-m", "largo", "operator"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "largo operator: LARGO_RECONCILE_WORKERS='0': Input should be greater than or equal to 1",
        "largo operator: LARGO_AUTOSCALE_PERIOD_SECONDS='0': Input should be greater than or equal to 0.1",
    ]
    assert "Traceback" not in run.stderr
