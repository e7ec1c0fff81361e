"""Newline-delimited JSON over a stream, bounded by ``INFRA_MESSAGE_MAX`` (stdlib only)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..platform._limits import INFRA_MESSAGE_MAX

__all__ = ["ChannelClosed", "read_message", "write_message"]


class ChannelClosed(Exception):
    """The peer closed the channel, or sent something that is not a bounded JSON object."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """One JSON object; ``ChannelClosed`` at end of stream or on an oversized/bad line."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise ChannelClosed("channel closed") from exc
    except asyncio.LimitOverrunError as exc:
        raise ChannelClosed(f"message over {INFRA_MESSAGE_MAX} bytes") from exc
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ChannelClosed(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ChannelClosed("message is not a JSON object")
    return data


async def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > INFRA_MESSAGE_MAX:
        raise ValueError(f"message over {INFRA_MESSAGE_MAX} bytes")
    writer.write(data)
    await writer.drain()
