"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from magikrun.platform import Paths


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (unix sockets allow 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def paths(short_tmp: Path) -> Paths:
    """An isolated magikrun root for one test."""
    return Paths.resolve(short_tmp / "root").ensure()


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
