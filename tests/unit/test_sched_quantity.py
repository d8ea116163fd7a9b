"""Quantity parsing and formatting."""

from decimal import Decimal

import pytest
from kubernetes.utils import parse_quantity as k8s_parse_quantity
from largo.sched.quantity import (
    format_resource,
    parse_quantity,
    parse_resource,
    parse_resources,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("100m", Decimal("0.1")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("4Gi", Decimal(4 * 2**30)),
        ("500M", Decimal(500_000_000)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("2e-3", Decimal("0.002")),
        ("1E", Decimal(10**18)),
        ("1k", Decimal(1000)),
        ("1Ki", Decimal(1024)),
        ("3Mi", Decimal(3 * 2**20)),
        ("1Ti", Decimal(2**40)),
        ("250n", Decimal("0.00000025")),
        ("7u", Decimal("0.000007")),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        ("+3", Decimal(3)),
        ("-1", Decimal(-1)),
        (8, Decimal(8)),
        (0.25, Decimal("0.25")),
    ],
)
def test_parse_quantity(raw: str | float, expected: Decimal) -> None:
    assert parse_quantity(raw) == expected


@pytest.mark.parametrize("raw", ["100m", "2", "1.5", "4Gi", "500M", "1e3", "1E", "1Ki", "250n", ".5", "12Mi"])
def test_parse_quantity_agrees_with_kubernetes_client(raw: str) -> None:
    assert parse_quantity(raw) == k8s_parse_quantity(raw)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "abc",
        "1Xi",
        "1ki",
        "1mi",
        "NaN",
        "Infinity",
        "--1",
        "1 Gi",
        "1e",
        "e3",
        "1.2.3",
        True,
    ],
)
def test_parse_quantity_rejects_garbage(raw: object) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(raw)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [float("nan"), float("inf")])
def test_parse_quantity_rejects_non_finite_numbers(raw: float) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(raw)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("cpu", "100m", 100),
        ("cpu", "2", 2000),
        ("cpu", "1.5", 1500),
        ("cpu", "0.1m", 1),  # rounds up, never under-counts
        ("cpu", "1e3", 1_000_000),
        ("cpu", 4, 4000),
        ("memory", "4Gi", 4 * 2**30),
        ("memory", "500M", 500_000_000),
        ("memory", "1.5", 2),
        ("memory", "100m", 1),
        ("nvidia.com/gpu", "8", 8),
        ("nvidia.com/gpu", 2, 2),
        ("ephemeral-storage", "10Gi", 10 * 2**30),
        ("memory", "0", 0),
    ],
)
def test_parse_resource_canonical_units(name: str, raw: str | int, expected: int) -> None:
    value = parse_resource(name, raw)
    assert value == expected
    assert isinstance(value, int)


def test_parse_resource_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_resource("cpu", "-1")


def test_parse_resource_rejects_out_of_int64_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_resource("cpu", "1E")  # 10**21 millicores


def test_parse_resources() -> None:
    assert parse_resources({"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": "4"}) == {
        "cpu": 500,
        "memory": 2**30,
        "nvidia.com/gpu": 4,
    }
    assert parse_resources(None) == {}
    assert parse_resources({}) == {}


@pytest.mark.parametrize(
    ("name", "amount", "expected"),
    [
        ("cpu", 1500, "1500m"),
        ("cpu", 8000, "8"),
        ("cpu", 0, "0"),
        ("memory", 64 * 2**30, "64Gi"),
        ("memory", 3 * 2**20, "3Mi"),
        ("memory", 1000, "1000"),
        ("nvidia.com/gpu", 1024, "1024"),
        ("ephemeral-storage", 2**40, "1Ti"),
    ],
)
def test_format_resource(name: str, amount: int, expected: str) -> None:
    assert format_resource(name, amount) == expected
