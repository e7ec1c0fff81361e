"""vminit's JSON on ``_json`` alone: the same text and values as ``json``, the same errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from magikrun.vminit._protocol import decode, dumps, encode, loads

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "magikrun"

VALUES = [
    {"id": 1, "op": "exec", "argv": ["sh", "-c", 'echo "é\\n"'], "env": {}, "limit": 2.5},
    [None, True, False, 0, -1, 10**30, 1e300, -0.0, "", "\u2603\x00"],
    {"nested": {"a": [{"b": []}]}},
    "text",
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_and_loads_agree_with_json(value: object) -> None:
    text = dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert loads(text) == value
    assert loads(json.dumps(value, indent=2).encode()) == value


def test_loads_reads_what_json_reads_around_a_value() -> None:
    assert loads(' \t{"a": 1}\r\n') == {"a": 1}
    assert math.isnan(loads("NaN"))  # type: ignore[arg-type]
    assert loads("[Infinity]") == [math.inf]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Expecting value: char 0"),
        ("  ", "Expecting value: char 2"),
        ("[1] [2]", "Extra data: char 3"),
        ('{"a": 1,}', "Expecting property name enclosed in double quotes"),
        ('"\\x"', "Invalid \\\\escape"),
        (b"\xff", "codec can't decode"),
    ],
)
def test_loads_refuses_what_is_not_one_json_value(text: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loads(text)


def test_dumps_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="Object of type bytes is not JSON serializable"):
        dumps({"data": b"x"})


def test_frames_round_trip_and_refuse_non_objects() -> None:
    assert decode(encode({"id": 7, "op": "ping"}, 100)) == {"id": 7, "op": "ping"}
    with pytest.raises(ValueError, match="JSON object"):
        decode(b'"ping"\n')
    with pytest.raises(ValueError, match="Extra data"):
        decode(b'{"id": 1} {"id": 2}\n')


def test_the_guest_boot_imports_none_of_the_costly_modules() -> None:
    """What vminit's bootstrap imports: each of these cost the boot tens to hundreds of
    milliseconds under TCG (``json`` and ``signal`` bring in ``re`` and ``enum``)."""
    packages = [("magikrun", str(PACKAGE)), ("magikrun.vminit", str(PACKAGE / "vminit"))]
    code = (
        "import sys, types\n"
        f"for n, p in {packages!r}:\n"
        "    m = types.ModuleType(n); m.__path__ = [p]; sys.modules[n] = m\n"
        "import magikrun.vminit.__main__\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "magikrun.vminit._server" in loaded
    costly = {"re", "enum", "json", "signal", "selectors", "collections", "typing", "asyncio"}
    assert not loaded & costly, sorted(loaded & costly)
