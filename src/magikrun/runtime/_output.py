"""A container's last output, made fit for an error message.

An error that outlives the container's log (a pod's init container, whose pod was
rolled back) carries the log's end instead. The container wrote it, so it is bounded
and its control characters are escaped: it cannot flood the message or forge what a
terminal shows.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from ..platform._limits import MAX_INIT_OUTPUT_BYTES, MAX_INIT_OUTPUT_LINES

__all__ = ["last_output"]

_ESCAPED = ("Cc", "Cf", "Cs")
"""Unicode categories shown as escapes: controls, format characters (bidi overrides),
lone surrogates."""
_CUT = " …"
"""Ends a line that alone was longer than the bound (its start is kept)."""


def last_output(lines: Iterable[str]) -> str:
    """The last lines, newline-joined: at most ``MAX_INIT_OUTPUT_LINES`` lines and
    ``MAX_INIT_OUTPUT_BYTES`` bytes of UTF-8, cut at line boundaries (only a last line
    longer than the bound alone is cut, keeping its start), control characters other
    than tab escaped. Applying it to its own result changes nothing.

    Example::

        last_output(["step 1", "\\x1b[2Jfailed"])  # 'step 1\\n\\\\x1b[2Jfailed'
    """
    kept: list[str] = []
    size = 0
    for line in reversed(list(lines)[-MAX_INIT_OUTPUT_LINES:]):
        text = _escape(line)
        size += len(text.encode()) + (1 if kept else 0)
        if size > MAX_INIT_OUTPUT_BYTES:
            if not kept:
                kept.append(_cut(text))
            break
        kept.append(text)
    return "\n".join(reversed(kept))


def _escape(line: str) -> str:
    """Characters of the categories above as Python writes them (``\\x1b``, ``\\u202e``)."""
    return "".join(
        ch if ch == "\t" or unicodedata.category(ch) not in _ESCAPED else ascii(ch)[1:-1]
        for ch in line
    )


def _cut(text: str) -> str:
    room = MAX_INIT_OUTPUT_BYTES - len(_CUT.encode())
    return text.encode()[:room].decode(errors="ignore") + _CUT
