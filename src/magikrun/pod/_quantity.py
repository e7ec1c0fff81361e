"""Kubernetes resource quantities (``1.5Gi``, ``500m``, ``1e3``) as exact numbers.

Kubernetes parses quantities with arbitrary precision and rounds up when it needs an
integer (``MilliValue``, ``Value``); ``Decimal`` does the same here, so ``0.1m`` CPU is 1
millicore and ``1.5`` bytes are 2, never silently 0.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from ..errors import InvalidPodSpec

__all__ = ["cpu_millicores", "memory_bytes", "parse_quantity"]

_QUANTITY = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))([A-Za-z]*|[eE][+-]?[0-9]+)")

_EXPONENT = re.compile(r"[eE][+-]?[0-9]+")

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}

_MAX_EXPONENT = 30
"""Decimal exponents beyond this are no real resource and only cost time to compute."""


def parse_quantity(value: object, field: str) -> Decimal:
    """Parse a quantity written as a string, YAML int or YAML float.

    ``field`` is the manifest path named in the error, e.g. ``spec.containers[0].resources``.
    Negative quantities are refused: no resource a pod asks for can be negative.
    """
    if isinstance(value, bool):
        raise InvalidPodSpec(f"{field}: expected a quantity, got boolean", field=field)
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPodSpec(f"{field}: {value} is not a valid quantity", field=field)
        number = Decimal(repr(value))
    elif isinstance(value, str):
        number = _parse_text(value.strip(), field)
    else:
        raise InvalidPodSpec(
            f"{field}: expected a quantity, got {type(value).__name__}", field=field
        )
    if number < 0:
        raise InvalidPodSpec(f"{field}: {value} must not be negative", field=field)
    return number


def _parse_text(text: str, field: str) -> Decimal:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise InvalidPodSpec(
            f"{field}: {text!r} is not a valid quantity",
            field=field,
            hint="write e.g. 500m, 1.5, 128974848, 129e6, 129M or 123Mi",
        )
    digits, suffix = match.groups()
    try:
        number = Decimal(digits)
    except InvalidOperation as exc:
        raise InvalidPodSpec(f"{field}: {text!r} is not a valid quantity", field=field) from exc
    if _EXPONENT.fullmatch(suffix):
        exponent = int(suffix[1:])
        if abs(exponent) > _MAX_EXPONENT:
            raise InvalidPodSpec(f"{field}: {text!r} is out of range", field=field)
        return number.scaleb(exponent)
    multiplier = _SUFFIXES.get(suffix)
    if multiplier is None:
        raise InvalidPodSpec(
            f"{field}: {text!r} has an unknown suffix {suffix!r}",
            field=field,
            hint="use one of n u m k M G T P E Ki Mi Gi Ti Pi Ei",
        )
    return number * multiplier


def cpu_millicores(value: object, field: str) -> int:
    """A CPU quantity in millicores, rounded up as Kubernetes' ``MilliValue``."""
    return math.ceil(parse_quantity(value, field) * 1000)


def memory_bytes(value: object, field: str) -> int:
    """A memory quantity in bytes, rounded up as Kubernetes' ``Value``."""
    return math.ceil(parse_quantity(value, field))
