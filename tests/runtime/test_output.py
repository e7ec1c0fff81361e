"""A container's last output as an error carries it: bounded, escaped, whole lines."""

from __future__ import annotations

from magikrun.platform._limits import MAX_INIT_OUTPUT_BYTES, MAX_INIT_OUTPUT_LINES
from magikrun.runtime._output import last_output


def test_short_output_is_kept_as_it_is() -> None:
    assert last_output(["one", "two\tcolumns", "", "ünïcode"]) == "one\ntwo\tcolumns\n\nünïcode"
    assert last_output([]) == ""


def test_only_the_last_lines_are_kept() -> None:
    lines = [f"line {n}" for n in range(100)]
    kept = last_output(lines).split("\n")
    assert kept == lines[-MAX_INIT_OUTPUT_LINES:]


def test_long_lines_are_dropped_whole_from_the_front() -> None:
    lines = ["a" * 1000, "b" * 1000, "c" * 1000, "d" * 1000, "e" * 1000]
    assert last_output(lines).split("\n") == lines[-4:]
    assert len(last_output(lines).encode()) <= MAX_INIT_OUTPUT_BYTES


def test_a_last_line_longer_than_the_bound_keeps_its_start() -> None:
    text = last_output(["before", "é" * MAX_INIT_OUTPUT_BYTES])
    assert text.startswith("éé") and text.endswith(" …") and "\n" not in text
    assert MAX_INIT_OUTPUT_BYTES - 4 <= len(text.encode()) <= MAX_INIT_OUTPUT_BYTES


def test_control_characters_are_escaped_so_no_terminal_output_can_be_forged() -> None:
    raw = b"\x1b[2J\x1b[31mfake prompt\r\x07\x7f \xff\xfe end".decode(errors="replace")
    assert last_output([raw, "\u202eevil\u200b", "\x85next\ttab"]) == (
        "\\x1b[2J\\x1b[31mfake prompt\\r\\x07\\x7f \ufffd\ufffd end\n"
        "\\u202eevil\\u200b\n"
        "\\x85next\ttab"
    )


def test_escapes_count_toward_the_bound() -> None:
    text = last_output(["\x1b" * MAX_INIT_OUTPUT_BYTES])
    assert text.startswith("\\x1b\\x1b") and len(text.encode()) <= MAX_INIT_OUTPUT_BYTES


def test_applying_it_again_changes_nothing() -> None:
    for lines in (
        [f"{n} \x1b[0m" for n in range(50)],
        ["x" * 10 * MAX_INIT_OUTPUT_BYTES],
        ["a" * 1500, "b" * 1500, "c" * 1500],
    ):
        once = last_output(lines)
        assert last_output(once.split("\n")) == once
