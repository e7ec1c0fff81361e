"""Bundles that BundleBuilder writes, run by the real crun and runc."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from magikrun.image import BundleBuilder, ContainerConfig, Resources
from magikrun.platform import Paths
from tests.conftest import requires_root

RUNTIMES = [
    pytest.param(name, marks=pytest.mark.skipif(not shutil.which(name), reason=f"no {name}"))
    for name in ("crun", "runc")
]

pytestmark = [requires_root, pytest.mark.root]

UNIFIED = Path("/sys/fs/cgroup/unified")
HUGETLB_V1 = Path("/sys/fs/cgroup/hugetlb")


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        return any(line.split()[4] == str(path) for line in mountinfo)


@pytest.fixture(scope="session")
def hybrid_cgroups_fixed() -> None:
    """crun 1.8.1 refuses a hybrid host whose cgroup2 tree holds a controller (hugetlb
    here); mounting that controller's v1 hierarchy lets it run. The runtime package
    does this too; tests must not depend on which of them runs first."""
    controllers = UNIFIED / "cgroup.controllers"
    if not controllers.exists() or "hugetlb" not in controllers.read_text().split():
        return
    with open("/tmp/magikrun-hugetlb-mount.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _mounted(HUGETLB_V1):
            HUGETLB_V1.mkdir(exist_ok=True)
            subprocess.run(
                ["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB_V1)], check=True
            )


@pytest.fixture
def busybox_bundle(short_tmp: Path) -> Path:
    """A bundle directory whose rootfs holds static busybox and a passwd with 'nobody'."""
    bundle_dir = short_tmp / "bundle"
    rootfs = bundle_dir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy("/bin/busybox", rootfs / "bin/busybox")
    for applet in ("sh", "cat", "grep", "id", "pwd", "touch"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return bundle_dir


def _run(
    runtime: str, state_root: Path, bundle: Path, name: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [runtime, "--root", str(state_root), "run", "--bundle", str(bundle), name],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _cgroup_dir(controller: str, cgroups_path: str) -> Path:
    v1 = Path("/sys/fs/cgroup") / controller / cgroups_path.lstrip("/")
    return (
        v1
        if Path("/sys/fs/cgroup", controller).is_dir()
        else Path("/sys/fs/cgroup", cgroups_path.lstrip("/"))
    )


SCRIPT = """
cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max
grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status
grep -q magikrun /proc/self/cgroup && echo in-magikrun-cgroup
id -u; pwd
cat /proc/kcore 2>/dev/null || echo kcore-masked
touch /probe 2>/dev/null && echo rootfs-rw || echo rootfs-ro
"""


@pytest.mark.usefixtures("hybrid_cgroups_fixed")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bundle_runs_with_its_limits_and_hardening(
    runtime: str, busybox_bundle: Path, paths: Paths
) -> None:
    name = f"bt-{uuid.uuid4().hex[:12]}"
    bundle = BundleBuilder(paths).build_oci_bundle(
        None,
        ContainerConfig(
            name=name,
            command=["/bin/sh", "-c", SCRIPT],
            working_dir="/work",
            resources=Resources(memory_bytes=48 * 2**20, cpu_millicores=500, pids_limit=32),
        ),
        busybox_bundle / "rootfs",
        busybox_bundle,
    )
    state_root = paths.oci_root / runtime
    result = _run(runtime, state_root, bundle.path, name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(48 * 2**20)
    assert "CapBnd:\t00000000a80425fb" in lines  # containerd's 14 default capabilities
    assert "CapEff:\t00000000a80425fb" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "Seccomp:\t2" in lines  # a filter is installed
    assert lines[-5:] == ["in-magikrun-cgroup", "0", "/work", "kcore-masked", "rootfs-rw"]
    # `run` deleted the container: no state and no cgroup are left behind.
    listing = subprocess.run(
        [runtime, "--root", str(state_root), "list", "-q"], capture_output=True, text=True
    )
    assert name not in listing.stdout
    assert not _cgroup_dir("memory", bundle.spec["linux"]["cgroupsPath"]).exists()


@pytest.mark.usefixtures("hybrid_cgroups_fixed")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unprivileged_user_and_readonly_rootfs(
    runtime: str, busybox_bundle: Path, paths: Paths
) -> None:
    name = f"bt-{uuid.uuid4().hex[:12]}"
    bundle = BundleBuilder(paths).build_oci_bundle(
        None,
        ContainerConfig(
            name=name,
            command=["/bin/sh", "-c", SCRIPT],
            user="nobody",
            readonly_rootfs=True,
            rlimits={"nofile": (64, 10**9)},
        ),
        busybox_bundle / "rootfs",
        busybox_bundle,
    )
    result = _run(runtime, paths.oci_root / runtime, bundle.path, name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "CapEff:\t0000000000000000" in lines
    assert lines[-4:] == ["65534", "/", "kcore-masked", "rootfs-ro"]
    assert not (busybox_bundle / "rootfs/probe").exists()


@pytest.mark.usefixtures("hybrid_cgroups_fixed")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_seccomp_profile_is_enforced(runtime: str, busybox_bundle: Path, paths: Paths) -> None:
    """A user namespace needs no capability, so only the profile stops ``unshare -U``:
    the same bundle without ``linux.seccomp`` runs."""
    name = f"bt-{uuid.uuid4().hex[:12]}"
    bundle = BundleBuilder(paths).build_oci_bundle(
        None,
        ContainerConfig(
            name=name, command=["/bin/busybox", "unshare", "-U", "/bin/busybox", "true"]
        ),
        busybox_bundle / "rootfs",
        busybox_bundle,
    )
    state_root = paths.oci_root / runtime
    result = _run(runtime, state_root, bundle.path, name)
    assert result.returncode == 1
    assert "unshare(0x10000000): Operation not permitted" in result.stderr
    without = {**bundle.spec, "linux": {**bundle.spec["linux"]}}
    del without["linux"]["seccomp"]
    bundle.config_path.write_text(json.dumps(without))
    result = _run(runtime, state_root, bundle.path, name)
    assert result.returncode == 0, result.stderr


@pytest.mark.usefixtures("hybrid_cgroups_fixed")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_joining_another_containers_namespaces(
    runtime: str, busybox_bundle: Path, paths: Paths, short_tmp: Path
) -> None:
    """The pod shape: a second container joins the first one's network, IPC and UTS
    namespaces by path and sees the same ones."""
    for applet in ("readlink", "hostname", "sleep"):
        (busybox_bundle / "rootfs/bin" / applet).symlink_to("busybox")
    builder = BundleBuilder(paths)
    state_root = paths.oci_root / runtime
    holder = f"bt-{uuid.uuid4().hex[:12]}"
    builder.build_oci_bundle(
        None,
        ContainerConfig(name=holder, command=["/bin/sleep", "60"], hostname="pod-a"),
        busybox_bundle / "rootfs",
        busybox_bundle,
    )
    try:
        # Detached, the container keeps its stdio: give it a file, not our pipes.
        with open(short_tmp / "holder.log", "wb") as log:
            subprocess.run(
                [runtime, "--root", str(state_root), "run", "--detach", "--bundle",
                 str(busybox_bundle), holder],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60, check=True,
            )  # fmt: skip
        state = subprocess.run(
            [runtime, "--root", str(state_root), "state", holder],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        pid = json.loads(state.stdout)["pid"]
        member = f"bt-{uuid.uuid4().hex[:12]}"
        namespaces = {"network": "net", "ipc": "ipc", "uts": "uts"}
        bundle = builder.build_oci_bundle(
            None,
            ContainerConfig(
                name=member,
                command=[
                    "/bin/sh",
                    "-c",
                    "for n in net ipc; do readlink /proc/self/ns/$n; done; hostname",
                ],
                namespaces={kind: f"/proc/{pid}/ns/{ns}" for kind, ns in namespaces.items()},
            ),
            busybox_bundle / "rootfs",
            short_tmp / "member",
        )
        result = _run(runtime, state_root, bundle.path, member)
        assert result.returncode == 0, result.stderr
        expected = [os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("net", "ipc")]
        assert result.stdout.splitlines() == [*expected, "pod-a"]
    finally:
        subprocess.run(
            [runtime, "--root", str(state_root), "delete", "--force", holder],
            capture_output=True, check=False,
        )  # fmt: skip
