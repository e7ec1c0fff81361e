"""Kubernetes quantities: CPU to millicores, memory to bytes, bad input named by field."""

from __future__ import annotations

from decimal import Decimal

import pytest

from magikrun.errors import InvalidPodSpec
from magikrun.pod import cpu_millicores, memory_bytes, parse_quantity


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500m", 500),
        ("1", 1000),
        (1, 1000),
        (0.5, 500),
        ("0.1", 100),
        ("1.5", 1500),
        ("100u", 1),  # rounded up, as Kubernetes' MilliValue
        ("0.0001", 1),
        ("2k", 2_000_000),
        ("1e3", 1_000_000),
        ("1E-3", 1),
        ("0", 0),
    ],
)
def test_cpu_millicores(value: object, expected: int) -> None:
    assert cpu_millicores(value, "f") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("128974848", 128974848),
        (128974848, 128974848),
        ("129e6", 129_000_000),
        ("129M", 129_000_000),
        ("123Mi", 123 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("1Ki", 1024),
        ("1k", 1000),
        ("1Ti", 2**40),
        ("1Ei", 2**60),
        ("1.5", 2),  # rounded up, as Kubernetes' Value
        (64.0, 64),
        ("+5", 5),
        ("  7Mi ", 7 * 2**20),
    ],
)
def test_memory_bytes(value: object, expected: int) -> None:
    assert memory_bytes(value, "f") == expected


def test_parse_is_exact() -> None:
    assert parse_quantity("0.1", "f") == Decimal("0.1")
    assert parse_quantity(0.1, "f") == Decimal("0.1")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5Gb", "f: '1.5Gb' has an unknown suffix 'Gb'"),
        ("abc", "f: 'abc' is not a valid quantity"),
        ("", "f: '' is not a valid quantity"),
        ("1..5", "f: '1..5' is not a valid quantity"),
        ("1 Gi", "f: '1 Gi' is not a valid quantity"),
        ("-1", "f: -1 must not be negative"),
        (-2, "f: -2 must not be negative"),
        (True, "f: expected a quantity, got boolean"),
        ([1], "f: expected a quantity, got list"),
        (float("inf"), "f: inf is not a valid quantity"),
        ("1e99", "f: '1e99' is out of range"),
    ],
)
def test_invalid_quantities_name_the_field(value: object, message: str) -> None:
    with pytest.raises(InvalidPodSpec) as info:
        memory_bytes(value, "f")
    assert str(info.value) == message
    assert info.value.subject["field"] == "f"
