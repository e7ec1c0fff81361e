"""Lays out the test distribution as an installed one: module + ``dist-info``."""

from __future__ import annotations

import shutil
from pathlib import Path

ENTRY_POINTS = """\
[magikrun.infra_extensions]
recorder = magikrun_testext:Recorder
failstart = magikrun_testext:FailStart
slow = magikrun_testext:Slow
flaky = magikrun_testext:Flaky
porter = magikrun_testext:Porter
lingering = magikrun_testext:Lingering
"""


def install(target: Path) -> Path:
    """Install into ``target`` (a directory for ``MAGIKRUN_INFRA_PATH``); returns it."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("magikrun_testext.py"), target)
    info = target / "magikrun_testext-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: magikrun-testext\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return target
