"""crun on hybrid cgroup hosts: the hugetlb v1 mount that makes it work, and the runc fallback.

The live host was already fixed once (the kernel keeps the hugetlb v1 hierarchy
afterwards), so these tests point the fix at a copy of the hybrid layout in a
temporary directory and let it really mount there.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from magikrun.errors import RuntimeUnavailable
from magikrun.platform import Paths
from magikrun.runtime import NativeRuntime, ensure_cgroup_compat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting cgroups needs root")


def _hybrid(root: Path, held_by_v2: str) -> Path:
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text(held_by_v2 + "\n")
    (root / "memory").mkdir()
    return root


def _mounted(target: Path) -> bool:
    return any(
        line.split()[1] == str(target) for line in Path("/proc/mounts").read_text().splitlines()
    )


async def test_hybrid_host_gets_hugetlb_v1_mounted(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
):
    root = _hybrid(short_tmp / "cg", "hugetlb")
    try:
        with caplog.at_level(logging.WARNING, logger="magikrun.runtime"):
            note = await ensure_cgroup_compat(root)
        assert (
            note is not None
            and f"mounted the hugetlb cgroup v1 hierarchy at {root}/hugetlb" in note
        )
        assert _mounted(root / "hugetlb")
        assert (root / "hugetlb" / "hugetlb.2MB.limit_in_bytes").exists()
        assert note in caplog.text
    finally:
        if _mounted(root / "hugetlb"):
            subprocess.run(["umount", str(root / "hugetlb")], check=True)


async def test_failed_fix_is_runtime_unavailable(short_tmp: Path):
    root = _hybrid(short_tmp / "cg", "nosuchcontroller")
    with pytest.raises(
        RuntimeUnavailable, match="mounting the nosuchcontroller cgroup v1 hierarchy failed"
    ):
        await ensure_cgroup_compat(root)
    assert not _mounted(root / "nosuchcontroller")


async def test_default_falls_back_to_runc_with_reason(paths: Paths, short_tmp: Path):
    runtime = NativeRuntime(paths, cgroup_root=_hybrid(short_tmp / "cg", "nosuchcontroller"))
    assert (await runtime.binary()).endswith("runc")
    assert runtime.fallback_reason is not None and "using runc instead" in runtime.fallback_reason


async def test_explicit_crun_does_not_fall_back(paths: Paths, short_tmp: Path):
    runtime = NativeRuntime(
        paths, oci_binary="crun", cgroup_root=_hybrid(short_tmp / "cg", "nosuchcontroller")
    )
    with pytest.raises(RuntimeUnavailable, match="hybrid cgroup host"):
        await runtime.binary()


async def test_fix_on_this_host_is_idempotent():
    await ensure_cgroup_compat()
    assert await ensure_cgroup_compat() is None
