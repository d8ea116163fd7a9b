"""Kubernetes resource quantities to and from canonical integers.

``cpu`` becomes millicores; every other resource becomes a plain integer (bytes for memory and
storage, a count for extended resources). Fractions round up, like ``Quantity.MilliValue`` /
``Quantity.Value`` in Kubernetes, so a request is never under-counted.

The parser follows the apimachinery grammar itself rather than importing the kubernetes client,
which keeps this module dependency-free and strict (no NaN, no Infinity).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from largo.sched.types import CPU

QuantityInput = str | int | float | Decimal

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}

# The exponent alternative comes first so "1e3" is 1000 while a bare "1E" is one exa.
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?P<suffix>[eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?"
)

# Kubernetes quantities are int64 once scaled; anything larger is a typo, not a real node.
_MAX = Decimal(2**63 - 1)

_BINARY_UNITS = sorted(_BINARY.items(), key=lambda item: -item[1])


def parse_quantity(value: QuantityInput) -> Decimal:
    """Parse a quantity such as ``"100m"``, ``"4Gi"``, ``"1e3"`` or ``2`` into an exact Decimal."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float | Decimal):
        result = Decimal(value)
        if not result.is_finite():
            raise ValueError(f"invalid quantity {value!r}")
        return result
    if not isinstance(value, str):
        raise ValueError(f"invalid quantity {value!r}")
    match = _QUANTITY.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"invalid quantity {value!r}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"invalid quantity {value!r}") from exc
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    return number.scaleb(int(suffix[1:]))


def parse_resource(name: str, value: QuantityInput) -> int:
    """Canonical integer for one resource: millicores for ``cpu``, whole units otherwise."""
    amount = parse_quantity(value)
    if name == CPU:
        amount = amount.scaleb(3)
    if amount < 0:
        raise ValueError(f"negative quantity {value!r} for {name}")
    if amount > _MAX:
        raise ValueError(f"quantity {value!r} for {name} is out of range")
    return math.ceil(amount)


def parse_resources(raw: Mapping[str, QuantityInput] | None) -> dict[str, int]:
    """Parse a Kubernetes resource list (``{"cpu": "500m", "memory": "1Gi"}``)."""
    if not raw:
        return {}
    return {name: parse_resource(name, value) for name, value in raw.items()}


def format_resource(name: str, amount: int) -> str:
    """Short human form of a canonical amount, for messages: ``1500m``, ``8``, ``64Gi``."""
    if name == CPU:
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if amount > 0 and _is_bytes(name):
        for suffix, unit in _BINARY_UNITS:
            if amount % unit == 0:
                return f"{amount // unit}{suffix}"
    return str(amount)


def _is_bytes(name: str) -> bool:
    return name in ("memory", "ephemeral-storage", "storage") or name.startswith("hugepages-")
