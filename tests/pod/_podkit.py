"""What the pod runtime tests share: a per-test network, demo images and the leak check.

Each test gets its own bridge and /24 (as test_network.py), so tests run side by side
under xdist. ``PodEnv.leftovers()`` enumerates everything a pod can leave behind:
processes (by cgroup), mounts under the root, cgroups, netns files, CNI allocations
and records, veths, state rows, bundle/container/rootfs/pod directories.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from magikrun.errors import PodStartFailed
from magikrun.image import BundleBuilder, ImageService, LayoutWriter, build_demo_images
from magikrun.image._mediatypes import WASM_CONFIG, WASM_LAYER
from magikrun.platform import Paths
from magikrun.pod import NativePodRuntime, PodNetwork, PodSpec, WasmPodRuntime
from magikrun.pod._state import PodStore

BUSYBOX = "magikrun.local/busybox:demo"
HELLO = "magikrun.local/hello-wasm:demo"
WAT_DIR = Path(__file__).parent / "wasm"
CGROUP_ROOT = Path("/sys/fs/cgroup")
FAILING_INIT = "echo one; echo two; echo oops >&2; exit 7"
"""An init container's command: two lines to stdout, one to stderr, then it fails."""


def free_subnet() -> str:
    used = subprocess.run(
        ["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    while True:
        candidate = f"10.{200 + secrets.randbelow(55)}.{secrets.randbelow(256)}.0/24"
        if candidate.split("/")[0].rsplit(".", 1)[0] + "." not in used:
            return candidate


def pod_yaml(name: str, containers: str, extra: str = "", *, restart: str = "Never") -> bytes:
    """A Pod manifest; ``containers`` is the YAML list body (indented 2)."""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n"
        f"  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 5\n{extra}"
        f"  containers:\n{containers}"
    ).encode()


def busybox(name: str, command: str, extra: str = "") -> str:
    """One busybox container entry running ``sh -c command``."""
    return (
        f"  - name: {name}\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n"
        f"    command: [sh, -c, {command!r}]\n{extra}"
    )


def check_init_failure(error: PodStartFailed, name: str = "setup") -> None:
    """``error`` failed the pod for init container ``name`` as FAILING_INIT does: with
    code 7 and its three lines (their order across the two streams is not fixed)."""
    assert (error.step, error.container, error.exit_code) == ("init", name, 7)
    first, header, *block = error.message.split("\n")
    assert f"failed: init container {name!r} exited with code 7; undone: " in first
    assert first.endswith("nothing is left")
    assert header == "its last output:"
    assert sorted(block) == ["  | one", "  | oops", "  | two"]
    assert block.index("  | one") < block.index("  | two")
    assert sorted(error.output.split("\n")) == ["one", "oops", "two"]
    assert error.hint == (
        "fix the init container's command or image; the pod was rolled back, so its log is gone"
    )


def unique(prefix: str = "p") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


class PodEnv:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.bridge = f"mp{secrets.token_hex(4)}"
        self.subnet = free_subnet()
        self.net = PodNetwork(paths, bridge=self.bridge, subnet=self.subnet)
        self.tag = BundleBuilder(paths)._cgroup_tag

    def native(self, **kwargs: Any) -> NativePodRuntime:
        return NativePodRuntime(self.paths, network=self.net, restart_backoff=0.2, **kwargs)

    def wasm(self, **kwargs: Any) -> WasmPodRuntime:
        return WasmPodRuntime(self.paths, restart_backoff=0.2, **kwargs)

    def veths(self) -> list[str]:
        out = subprocess.run(
            ["ip", "-o", "link", "show", "master", self.bridge], capture_output=True, text=True
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def cgroups(self) -> list[str]:
        found = []
        for hierarchy in CGROUP_ROOT.iterdir():
            base = hierarchy / "magikrun"
            if base.is_dir():
                found += [str(p) for p in base.glob(f"{self.tag}-*")]
        return found

    def processes(self) -> list[str]:
        """Processes in this root's container cgroups, or running its supervisors."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cgroup = (entry / "cgroup").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"magikrun/{self.tag}-" in cgroup or (
                "magikrun.pod._supervisor" in cmdline and str(self.paths.data) in cmdline
            ):
                found.append(f"{entry.name}: {cmdline}")
        return found

    def mounts(self) -> list[str]:
        text = Path("/proc/self/mountinfo").read_text()
        return [line for line in text.splitlines() if str(self.paths.data) in line]

    def ipam(self) -> list[str]:
        """Addresses this root holds on its own bridge and on the shared ``magikrun0``."""
        return self.net.allocated() + PodNetwork(self.paths).allocated()

    def rows(self) -> list[str]:
        store = PodStore(self.paths)
        with store.meta.transaction() as conn:
            pods = [r[0] for r in conn.execute("SELECT id FROM pods")]
            resources = [
                f"{r[0]}:{r[1]}" for r in conn.execute("SELECT pod_id, kind FROM pod_resources")
            ]
        return pods + resources

    def dirs(self) -> list[str]:
        found = []
        for name in ("bundles", "containers", "pods", "rootfs", "netns", "cni/pods"):
            directory = self.paths.run / name
            if directory.is_dir():
                found += [f"{name}/{p.name}" for p in directory.iterdir() if p.name != ".lock"]
        snapshots_rootfs = self.paths.data / "snapshots" / "rootfs"
        if snapshots_rootfs.is_dir():
            found += [
                f"rootfs/{p.name}" for p in snapshots_rootfs.iterdir() if not p.name.startswith(".")
            ]
        return found

    def leftovers(self) -> dict[str, list[str]]:
        deadline = time.monotonic() + 10  # the kernel drops a namespace's veth asynchronously
        while self.veths() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = {
            "processes": self.processes(),
            "mounts": self.mounts(),
            "cgroups": self.cgroups(),
            "ipam": self.ipam(),
            "veths": self.veths(),
            "rows": self.rows(),
            "dirs": self.dirs(),
        }
        return {k: v for k, v in found.items() if v}

    async def cleanup(self) -> None:
        runtime = self.native()
        for status in await runtime.list_pods():
            await runtime.delete_pod(status.id, force=True)
        wasm = self.wasm()
        for status in await wasm.list_pods():
            await wasm.delete_pod(status.id, force=True)
        await self.net.remove_bridge()


@pytest.fixture
async def env(paths: Paths) -> AsyncIterator[PodEnv]:
    paths.ensure()
    await build_demo_images(paths)
    state = PodEnv(paths)
    try:
        yield state
    finally:
        await state.cleanup()


async def import_wasm_image(paths: Paths, ref: str, wat: str) -> None:
    """Import a wasm image whose one layer is ``wasm/<wat>.wat`` compiled."""
    module = bytes(wasmtime.wat2wasm((WAT_DIR / f"{wat}.wat").read_text()))
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Entrypoint": [f"/{wat}.wasm"]},
    }
    with tempfile.TemporaryDirectory(prefix="magikrun-wat-") as tmp:
        writer = LayoutWriter(Path(tmp))
        writer.add_image(
            ref_name=ref,
            config=config,
            config_media_type=WASM_CONFIG,
            layers=[(WASM_LAYER, module)],
            artifact_type=WASM_CONFIG,
        )
        writer.write_index()
        await ImageService(paths).import_(tmp)


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    """Poll an async predicate until true (a bounded wait, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.1)


def spec(data: bytes) -> PodSpec:
    return PodSpec.from_yaml(data)
