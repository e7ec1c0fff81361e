"""Platform detection: the parsers on sample texts, and the live verdicts against evidence
gathered independently of the code under test."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform as stdlib_platform
import shutil
import subprocess
from pathlib import Path

import pytest

from magikrun.errors import StorageError
from magikrun.platform import (
    NAMESPACES,
    Capability,
    CgroupMode,
    HypervisorKind,
    Paths,
    Platform,
    find_tools,
    hypervisor_status,
    parse_cgroups,
    parse_filesystems,
    parse_mounts,
    parse_proc_cgroup,
)
from magikrun.platform._detect import _probe_key
from tests.conftest import requires_root

V1_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0
"""

V2_MOUNTS = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
overlay /var/lib/x\\040y overlay rw,relatime,lowerdir=/a:/b,upperdir=/u,workdir=/w 0 0
"""

# This machine as delivered: v1 controllers, and cgroup2 holding hugetlb.
HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""

V1_SELF = """\
12:pids:/user.slice/user-1000.slice/session-2.scope
5:cpu,cpuacct:/user.slice
4:memory:/user.slice/user-1000.slice/session-2.scope
1:name=systemd:/user.slice/user-1000.slice/session-2.scope
"""

V2_SELF = "0::/user.slice/user-1000.slice/session-2.scope\n"

HYBRID_SELF = """\
9:name=systemd:/
4:memory:/process_api/3830
1:cpu:/
0::/
"""

FILESYSTEMS = """\
nodev\tsysfs
nodev\ttmpfs
\text4
nodev\tcgroup
nodev\tcgroup2
nodev\toverlay
\tvfat
"""


def test_parse_mounts_unescapes_octal_fields() -> None:
    mounts = parse_mounts(V2_MOUNTS)
    assert [m.fstype for m in mounts] == ["proc", "cgroup2", "overlay"]
    assert mounts[2].target == "/var/lib/x y"
    assert mounts[1].options[-1] == "memory_recursiveprot"


def test_parse_mounts_skips_malformed_lines() -> None:
    assert parse_mounts("garbage\n\nproc /proc proc rw 0 0\n") == parse_mounts(
        "proc /proc proc rw 0 0"
    )


def test_parse_cgroups_v1() -> None:
    cgroups = parse_cgroups(parse_mounts(V1_MOUNTS), {}, V1_SELF)
    assert cgroups.mode is CgroupMode.V1
    assert cgroups.unified is None
    assert cgroups.controllers == {"cpu", "cpuacct", "memory", "pids", "net_cls", "net_prio"}
    named = [h for h in cgroups.hierarchies if h.name]
    assert [(h.name, h.controllers) for h in named] == [("systemd", ())]
    assert not cgroups.unified_holds_controllers
    assert cgroups.membership[1].controllers == ("cpu", "cpuacct")


def test_parse_cgroups_v2_reads_controllers_of_the_unified_mount() -> None:
    controllers = {"/sys/fs/cgroup": "cpuset cpu io memory hugetlb pids rdma misc\n"}
    cgroups = parse_cgroups(parse_mounts(V2_MOUNTS), controllers, V2_SELF)
    assert cgroups.mode is CgroupMode.V2
    assert cgroups.unified is not None
    assert cgroups.unified.mountpoint == "/sys/fs/cgroup"
    assert "memory" in cgroups.controllers and "io" in cgroups.controllers
    assert not cgroups.unified_holds_controllers  # v2-only: the normal case, not hybrid
    assert [(m.hierarchy_id, m.controllers) for m in cgroups.membership] == [(0, ())]


def test_parse_cgroups_hybrid_with_controllers_on_cgroup2() -> None:
    controllers = {"/sys/fs/cgroup/unified": "hugetlb\n"}
    cgroups = parse_cgroups(parse_mounts(HYBRID_MOUNTS), controllers, HYBRID_SELF)
    assert cgroups.mode is CgroupMode.HYBRID
    assert cgroups.unified is not None
    assert cgroups.unified.controllers == ("hugetlb",)
    assert cgroups.unified_holds_controllers  # what makes crun 1.8.1 refuse


def test_parse_cgroups_hybrid_with_empty_cgroup2() -> None:
    cgroups = parse_cgroups(parse_mounts(HYBRID_MOUNTS), {"/sys/fs/cgroup/unified": ""})
    assert cgroups.mode is CgroupMode.HYBRID
    assert not cgroups.unified_holds_controllers
    assert cgroups.membership == ()


def test_parse_cgroups_without_any_hierarchy() -> None:
    assert parse_cgroups(parse_mounts("proc /proc proc rw 0 0\n"), {}).mode is CgroupMode.NONE


def test_parse_proc_cgroup_keeps_paths_and_skips_garbage() -> None:
    entries = parse_proc_cgroup(HYBRID_SELF + "not a line\nx:y:z\n")
    assert [(e.hierarchy_id, e.controllers, e.path) for e in entries] == [
        (9, ("name=systemd",), "/"),
        (4, ("memory",), "/process_api/3830"),
        (1, ("cpu",), "/"),
        (0, (), "/"),
    ]


def test_parse_filesystems() -> None:
    assert parse_filesystems(FILESYSTEMS) == {
        "sysfs",
        "tmpfs",
        "ext4",
        "cgroup",
        "cgroup2",
        "overlay",
        "vfat",
    }
    assert "overlay" not in parse_filesystems("nodev\tproc\n\text4\n")


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform.detect(Paths.resolve(tmp_path_factory.mktemp("root")))


def _mountinfo_fstypes() -> dict[str, str]:
    """mountpoint -> fstype from /proc/self/mountinfo (another file than the code reads)."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        found[before.split()[4]] = after.split()[0]
    return found


def test_detect_is_cached_per_process(detected: Platform, paths: Paths) -> None:
    assert Platform.detect(paths) is detected


def test_basic_facts_match_the_system(detected: Platform) -> None:
    assert detected.os == "linux"
    assert detected.kernel == Path("/proc/sys/kernel/osrelease").read_text().strip()
    dpkg = shutil.which("dpkg")
    if dpkg:
        arch = subprocess.run([dpkg, "--print-architecture"], capture_output=True, text=True)
        assert detected.arch == arch.stdout.strip()
    assert detected.oci_platform.startswith(f"linux/{detected.arch}")
    if stdlib_platform.machine() == "x86_64":
        assert detected.oci_platform == "linux/amd64"


def test_namespaces_match_proc(detected: Platform) -> None:
    present = {n for n in NAMESPACES if os.path.exists(f"/proc/{os.getpid()}/ns/{n}")}
    assert detected.namespaces == present
    if detected.supports_native_containers():
        assert {"pid", "mnt", "net"} <= detected.namespaces


def test_cgroup_mode_matches_independent_evidence(detected: Platform) -> None:
    fstypes = _mountinfo_fstypes()
    has_v2 = "cgroup2" in fstypes.values()
    has_v1 = "cgroup" in fstypes.values()
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        assert detected.cgroups.mode is CgroupMode.V2
        assert detected.cgroups.unified is not None
        assert detected.cgroups.unified.mountpoint == "/sys/fs/cgroup"
    elif has_v1 and has_v2:
        assert detected.cgroups.mode is CgroupMode.HYBRID
    elif has_v1:
        assert detected.cgroups.mode is CgroupMode.V1
    # /proc/cgroups: name, hierarchy id (0 = cgroup2 or unmounted), cgroups, enabled.
    proc_cgroups = {
        fields[0]: int(fields[1])
        for line in Path("/proc/cgroups").read_text().splitlines()
        if not line.startswith("#") and len(fields := line.split()) == 4
    }
    for hierarchy in detected.cgroups.hierarchies:
        assert fstypes[hierarchy.mountpoint] == ("cgroup2" if hierarchy.version == 2 else "cgroup")
        for controller in hierarchy.controllers:
            assert (proc_cgroups[controller] != 0) == (hierarchy.version == 1), controller


def test_unified_controllers_match_cgroup2_files(detected: Platform) -> None:
    unified = detected.cgroups.unified
    if unified is None:
        pytest.skip("no cgroup2 hierarchy on this host")
    files = os.listdir(unified.mountpoint)
    for controller in unified.controllers:
        assert any(f.startswith(f"{controller}.") for f in files)
    assert detected.cgroups.unified_holds_controllers == (
        detected.cgroups.mode is CgroupMode.HYBRID and bool(unified.controllers)
    )


def test_seccomp_and_wasm_match_evidence(detected: Platform) -> None:
    if os.path.exists("/proc/sys/kernel/seccomp/actions_avail"):
        assert detected.seccomp
    try:
        importlib.metadata.version("wasmtime")
        assert detected.wasm
    except importlib.metadata.PackageNotFoundError:
        assert not detected.wasm


@requires_root
def test_user_namespaces_match_unshare(detected: Platform) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare is missing")
    done = subprocess.run([unshare, "--user", "true"], capture_output=True)
    assert detected.user_namespaces == (done.returncode == 0), done.stderr


@requires_root
def test_overlayfs_matches_a_real_mount(detected: Platform, short_tmp: Path) -> None:
    for name in ("lower", "upper", "work", "merged"):
        (short_tmp / name).mkdir()
    (short_tmp / "lower" / "file").write_text("lower")
    options = f"lowerdir={short_tmp}/lower,upperdir={short_tmp}/upper,workdir={short_tmp}/work"
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(short_tmp / "merged")],
        capture_output=True,
    )
    try:
        assert detected.overlayfs == (done.returncode == 0), done.stderr
        if done.returncode == 0:
            assert (short_tmp / "merged" / "file").read_text() == "lower"
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", str(short_tmp / "merged")], check=True)


def test_hypervisor_verdict_is_consistent(detected: Platform) -> None:
    verdict = detected.hypervisor
    assert verdict.reason.strip()
    qemu = shutil.which(f"qemu-system-{os.uname().machine}")
    if verdict.kind is HypervisorKind.KVM:
        assert os.path.exists("/dev/kvm")
        assert qemu is not None
    elif verdict.kind is HypervisorKind.TCG_ONLY:
        assert qemu is not None
    else:
        assert qemu is None
    if not os.path.exists("/dev/kvm"):
        assert verdict.kind is not HypervisorKind.KVM
    assert detected.has_hypervisor() == (verdict.kind is HypervisorKind.KVM)
    caps = detected.capabilities
    assert (Capability.HYPERVISOR in caps) == detected.has_hypervisor()
    assert (Capability.EMULATOR in caps) == (qemu is not None)


def test_capabilities_follow_the_facts(detected: Platform) -> None:
    caps = detected.capabilities
    assert (Capability.WASM_RUNTIME in caps) == detected.wasm
    assert (Capability.NATIVE_CONTAINERS in caps) == detected.supports_native_containers()
    assert (Capability.OVERLAYFS in caps) == detected.overlayfs
    assert (Capability.CGROUPS_V2 in caps) == (
        detected.cgroups.mode in (CgroupMode.V2, CgroupMode.HYBRID)
    )
    assert json.loads(json.dumps(detected.to_dict()))["capabilities"] == sorted(caps)


def test_find_tools_reports_real_versions() -> None:
    tools = {t.name: t for t in find_tools()}
    assert {"crun", "runc", "conmon", "virtiofsd", "guest-kernel"} <= tools.keys()
    for name in ("crun", "runc", "conmon"):
        tool = tools[name]
        assert tool.path == shutil.which(name)
        if tool.path:
            out = subprocess.run([tool.path, "--version"], capture_output=True, text=True)
            assert tool.version and tool.version in out.stdout
        else:
            assert tool.version is None


# The disk cache of the hypervisor verdict. Each probe here is real (about a second
# where KVM emulates, less where it is hardware, up to the probe boot's deadline).

SENTINEL = "planted by the test, never by a probe"


def _plant(cache: Path, key: dict[str, str | None]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "kind": "kvm", "reason": SENTINEL}
    (cache / "hypervisor.json").write_text(json.dumps(record))


def test_cache_is_reused_on_the_second_call(paths: Paths) -> None:
    first = hypervisor_status(paths.cache)
    stat = (paths.cache / "hypervisor.json").stat()
    assert hypervisor_status(paths.cache) == first
    again = (paths.cache / "hypervisor.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert os.listdir(paths.cache) == ["hypervisor.json"]


def test_cache_for_this_boot_is_trusted(paths: Paths) -> None:
    _plant(paths.cache, _probe_key())
    verdict = hypervisor_status(paths.cache)
    assert (verdict.kind, verdict.reason) == (HypervisorKind.KVM, SENTINEL)


def test_other_boot_id_reprobes(paths: Paths) -> None:
    key = _probe_key()
    _plant(paths.cache, {**key, "boot_id": "00000000-0000-0000-0000-000000000000"})
    verdict = hypervisor_status(paths.cache)
    assert verdict.reason != SENTINEL
    stored = json.loads((paths.cache / "hypervisor.json").read_text())
    assert stored["key"] == key
    assert stored["reason"] == verdict.reason


def test_corrupt_cache_reprobes(paths: Paths) -> None:
    paths.cache.mkdir(parents=True)
    (paths.cache / "hypervisor.json").write_text('{"key": ')
    verdict = hypervisor_status(paths.cache)
    assert json.loads((paths.cache / "hypervisor.json").read_text())["reason"] == verdict.reason


def test_cache_symlink_is_not_followed(paths: Paths, short_tmp: Path) -> None:
    elsewhere = short_tmp / "elsewhere"
    _plant(elsewhere, _probe_key())
    target = elsewhere / "hypervisor.json"
    before = target.read_text()
    paths.cache.mkdir(parents=True)
    (paths.cache / "hypervisor.json").symlink_to(target)
    verdict = hypervisor_status(paths.cache)
    assert verdict.reason != SENTINEL
    assert target.read_text() == before
    assert not (paths.cache / "hypervisor.json").is_symlink()


def test_unwritable_cache_raises_and_leaves_nothing(paths: Paths) -> None:
    paths.cache.write_text("a file where the cache directory belongs")
    with pytest.raises(StorageError) as info:
        hypervisor_status(paths.cache)
    assert str(paths.cache) in str(info.value)
    assert "--root" in info.value.hint
    assert paths.cache.read_text() == "a file where the cache directory belongs"
    assert sorted(p.name for p in paths.data.iterdir()) == ["cache", "run"]


def test_cache_dir_symlink_is_refused(paths: Paths, short_tmp: Path) -> None:
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    paths.cache.symlink_to(elsewhere)
    with pytest.raises(StorageError) as info:
        hypervisor_status(paths.cache)
    assert "cannot cache the hypervisor probe" in info.value.message
    assert os.listdir(elsewhere) == []


@requires_root
def test_full_disk_raises_and_leaves_no_temporary(paths: Paths) -> None:
    paths.cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(paths.cache)], check=True)
    try:
        (paths.cache / "fill").write_bytes(b"x" * 4096)
        with pytest.raises(StorageError) as info:
            hypervisor_status(paths.cache)
        assert "No space left on device" in info.value.message
        assert os.listdir(paths.cache) == ["fill"]
    finally:
        subprocess.run(["umount", str(paths.cache)], check=True)
