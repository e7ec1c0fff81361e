"""BundleBuilder: config.json contents, validation of hostile input, Wasm bundles.

The golden file pins the whole config.json for a representative image and
config; regenerate it with ``MAGIKRUN_REGEN_GOLDEN=1`` (see golden/README.md).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import resource
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import wasmtime
import zstandard

from magikrun.errors import BundleBuildFailed, ImageTooLarge, InvalidBundle
from magikrun.image import (
    Bundle,
    BundleBuilder,
    ContainerConfig,
    Image,
    ImageConfig,
    Layer,
    Mount,
    PlatformSpec,
    Resources,
    _bundle,
    open_wasm_module,
)
from magikrun.image._mediatypes import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, WASM_LAYER
from magikrun.platform import MAX_MEMORY_BYTES, Paths

GOLDEN = Path(__file__).parent / "golden" / "config_web.json"

# A module exporting _start that does nothing: the smallest runnable WASI command.
WASM_MODULE = bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))


def _image(config: ImageConfig, layers: tuple[Layer, ...] = (), kind: str = "oci") -> Image:
    return Image(
        reference="registry.test/library/app:1",
        manifest_digest="sha256:" + "a" * 64,
        config_digest="sha256:" + "b" * 64,
        platform=PlatformSpec("linux", "amd64"),
        config=config,
        layers=layers,
        kind=kind,  # type: ignore[arg-type]
    )


def _rootfs(bundle_dir: Path) -> Path:
    """A root filesystem with users, groups and a few directories (no programs needed)."""
    rootfs = bundle_dir / "rootfs"
    for sub in ("etc", "srv/app", "bin", "proc", "tmp"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "app:x:1000:1000:app:/srv/app:/bin/sh\n"
        "nobody:x:65534:65534::/:/bin/false\n"
    )
    (rootfs / "etc/group").write_text(
        "root:x:0:\napp:x:1000:\nwww:x:33:app\naudio:x:29:app,nobody\nnogroup:x:65534:\n"
    )
    return rootfs


@pytest.fixture
def bundle_dir(short_tmp: Path) -> Path:
    path = short_tmp / "bundle"
    _rootfs(path)
    return path


@pytest.fixture
def builder(paths: Paths) -> BundleBuilder:
    return BundleBuilder(paths)


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _build(
    builder: BundleBuilder,
    bundle_dir: Path,
    image_config: ImageConfig | None = None,
    **config: Any,
) -> Bundle:
    config.setdefault("name", _name())
    image = _image(image_config or ImageConfig(entrypoint=("/bin/sh",)))
    return builder.build_oci_bundle(
        image, ContainerConfig(**config), bundle_dir / "rootfs", bundle_dir
    )


def _contents(bundle_dir: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in bundle_dir.iterdir()}


def _refused(
    builder: BundleBuilder,
    bundle_dir: Path,
    match: str,
    image_config: ImageConfig | None = None,
    error: type[Exception] = BundleBuildFailed,
    **config: Any,
) -> Exception:
    """Build, expect ``error`` matching ``match``, and check nothing was written."""
    before = _contents(bundle_dir)
    with pytest.raises(error, match=match) as info:
        _build(builder, bundle_dir, image_config, **config)
    assert _contents(bundle_dir) == before
    assert getattr(info.value, "hint", "")
    return info.value


# --- the golden file -------------------------------------------------------------------------


def _golden_spec(short_tmp: Path) -> dict[str, Any]:
    bundle_dir = short_tmp / "golden"
    rootfs = _rootfs(bundle_dir)
    (rootfs / "srv/current").symlink_to("/srv/app")
    image = _image(
        ImageConfig(
            entrypoint=("/bin/server",),
            cmd=("--port", "80"),
            env=("PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "MODE=image"),
            working_dir="/srv/current",
            user="app",
        )
    )
    config = ContainerConfig(
        name="web-1",
        args=["--port", "8080", "--verbose"],
        env={"MODE": "production", "EXTRA": "1"},
        readonly_rootfs=True,
        capabilities_add=["net_admin"],
        capabilities_drop=["CAP_MKNOD", "NET_RAW"],
        resources=Resources(memory_bytes=128 * 2**20, cpu_millicores=250, pids_limit=64),
        namespaces={"network": "/proc/4242/ns/net", "ipc": "/proc/4242/ns/ipc"},
        mounts=[
            Mount(destination="/tmp", type="tmpfs", options=("nosuid", "size=16m")),
            Mount(destination="/data", source="/var/lib/app-data", options=("ro",)),
        ],
        annotations={"io.kubernetes.pod.name": "web"},
        rlimits={"nproc": (512, 1024)},
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
    )
    # A fixed root so that the cgroup path is the same on every run.
    bundle = BundleBuilder(Paths.resolve("/nonexistent/magikrun-golden")).build_oci_bundle(
        image, config, rootfs, bundle_dir
    )
    on_disk: dict[str, Any] = json.loads(bundle.config_path.read_text())
    assert on_disk == bundle.spec
    return on_disk


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the golden seccomp arches are x86")
@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NPROC)[1] < 1024
    or resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024,
    reason="the host's hard rlimits are below the golden file's",
)
def test_config_json_matches_golden_file(short_tmp: Path) -> None:
    spec = _golden_spec(short_tmp)
    if os.environ.get("MAGIKRUN_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(spec, indent=2) + "\n")
    assert spec == json.loads(GOLDEN.read_text())


def test_golden_file_has_the_hardening_defaults() -> None:
    """Reading the pinned file: the promises the golden file makes, spelled out."""
    spec = json.loads(GOLDEN.read_text())
    process, linux = spec["process"], spec["linux"]
    assert spec["ociVersion"] == "1.0.2"
    assert process["args"] == ["/bin/server", "--port", "8080", "--verbose"]
    assert process["env"] == [
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=C.UTF-8",
        "MODE=production",
        "EXTRA=1",
    ]
    assert process["cwd"] == "/srv/app"  # through the absolute link, inside the rootfs
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [29, 33]}
    assert process["noNewPrivileges"] is True
    assert "CAP_NET_ADMIN" in process["capabilities"]["bounding"]
    assert "CAP_MKNOD" not in process["capabilities"]["bounding"]
    assert process["capabilities"]["effective"] == []  # not root: no effective capabilities
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert {"type": "network", "path": "/proc/4242/ns/net"} in linux["namespaces"]
    assert {"type": "pid"} in linux["namespaces"]
    assert linux["cgroupsPath"].startswith("/magikrun/")
    assert linux["resources"]["memory"] == {"limit": 128 * 2**20}
    assert linux["resources"]["cpu"] == {"shares": 256, "quota": 25000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 64}
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = linux["seccomp"]["syscalls"][0]["names"]
    assert "read" in allowed and "mount" not in allowed and "kexec_load" not in allowed
    destinations = [m["destination"] for m in spec["mounts"]]
    assert destinations[:3] == ["/proc", "/dev", "/dev/pts"]
    assert destinations[-2:] == ["/tmp", "/data"]
    assert spec["mounts"][-1]["options"] == ["ro", "rbind"]


# --- process: argv, env, cwd, user -----------------------------------------------------------

IMAGE_ARGV = ImageConfig(entrypoint=("/ep", "-x"), cmd=("cmd-arg",))


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (None, None, ["/ep", "-x", "cmd-arg"]),
        (["/bin/other"], None, ["/bin/other"]),
        (None, ["a", "b"], ["/ep", "-x", "a", "b"]),
        (["/bin/other"], ["a"], ["/bin/other", "a"]),
        ([], [], ["/ep", "-x", "cmd-arg"]),
    ],
)
def test_command_and_args_follow_kubernetes(
    builder: BundleBuilder,
    bundle_dir: Path,
    command: list[str] | None,
    args: list[str] | None,
    expected: list[str],
) -> None:
    bundle = _build(builder, bundle_dir, IMAGE_ARGV, command=command, args=args)
    assert bundle.spec["process"]["args"] == expected


def test_nul_in_argv_is_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    _refused(builder, bundle_dir, r"args\[1\]: 'b\\x00c' contains a NUL byte", args=["a", "b\0c"])
    _refused(
        builder,
        bundle_dir,
        r"image.config.Cmd\[0\]: .*NUL",
        ImageConfig(entrypoint=("/ep",), cmd=("x\0",)),
    )


def test_empty_argv_is_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    _refused(builder, bundle_dir, "command: the process has no program to run", ImageConfig())
    _refused(builder, bundle_dir, "command: expected a list of strings", command="/bin/sh -c")


@pytest.mark.parametrize("entry", ["1BAD=x", "NOEQUALS", "=empty", "A B=c"])
def test_malformed_image_env_is_refused(
    builder: BundleBuilder, bundle_dir: Path, entry: str
) -> None:
    image = ImageConfig(entrypoint=("/ep",), env=("GOOD=1", entry))
    _refused(builder, bundle_dir, r"image.config.Env\[1\]: invalid environment entry", image)


def test_env_without_path_gets_the_default(builder: BundleBuilder, bundle_dir: Path) -> None:
    env = _build(builder, bundle_dir, env={"A": "1"}).spec["process"]["env"]
    assert env == ["A=1", f"PATH={_bundle.DEFAULT_PATH}"]
    _refused(
        builder, bundle_dir, r"env\[bad key\]: invalid environment entry", env={"bad key": "1"}
    )


def test_cwd_escaping_through_dotdot_is_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    error = _refused(
        builder,
        bundle_dir,
        r"image.config.WorkingDir: '/srv/../../etc' resolves outside the root filesystem",
        ImageConfig(entrypoint=("/ep",), working_dir="/srv/../../etc"),
    )
    assert error.field == "image.config.WorkingDir"  # type: ignore[attr-defined]


def test_cwd_escaping_through_a_symlink_is_refused(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    (bundle_dir / "rootfs/srv/escape").symlink_to("../../../../../../tmp")
    _refused(
        builder,
        bundle_dir,
        "working_dir: '/srv/escape/x' resolves outside the root filesystem",
        working_dir="/srv/escape/x",
    )


def test_cwd_into_proc_through_a_symlink_is_refused(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    """The CVE-2024-21626 shape: a WORKDIR that lands on /proc/self/fd/N."""
    (bundle_dir / "rootfs/srv/fd").symlink_to("/proc/self/fd/7")
    _refused(
        builder,
        bundle_dir,
        r"image.config.WorkingDir: working directory '/srv/fd' resolves into /proc",
        ImageConfig(entrypoint=("/ep",), working_dir="/srv/fd"),
    )


def test_symlink_loops_and_bad_cwds_are_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    (bundle_dir / "rootfs/loop").symlink_to("/loop")
    _refused(builder, bundle_dir, "too many levels of symbolic links", working_dir="/loop")
    _refused(builder, bundle_dir, "is not absolute", working_dir="srv/app")
    _refused(builder, bundle_dir, "is a file", working_dir="/etc/passwd")
    _refused(builder, bundle_dir, "is not a directory", working_dir="/etc/passwd/x")


def test_cwd_resolves_links_inside_the_rootfs_and_may_be_missing(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    (bundle_dir / "rootfs/srv/rel").symlink_to("app")
    (bundle_dir / "rootfs/abs").symlink_to("/srv/rel/")
    assert _build(builder, bundle_dir, working_dir="/abs/x/../").spec["process"]["cwd"] == (
        "/srv/app"
    )
    # The runtime creates a missing working directory, as Docker's WORKDIR does.
    assert _build(builder, bundle_dir, working_dir="/new/dir").spec["process"]["cwd"] == "/new/dir"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", {"uid": 0, "gid": 0}),
        ("app", {"uid": 1000, "gid": 1000, "additionalGids": [29, 33]}),
        ("app:www", {"uid": 1000, "gid": 33, "additionalGids": [29]}),
        ("1000", {"uid": 1000, "gid": 1000}),
        ("4242", {"uid": 4242, "gid": 0}),
        ("4242:4343", {"uid": 4242, "gid": 4343}),
        ("nobody:0", {"uid": 65534, "gid": 0, "additionalGids": [29]}),
    ],
)
def test_user_resolution(
    builder: BundleBuilder, bundle_dir: Path, user: str, expected: dict[str, Any]
) -> None:
    image = ImageConfig(entrypoint=("/ep",), user=user)
    assert _build(builder, bundle_dir, image).spec["process"]["user"] == expected


def test_unknown_or_malformed_users_are_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    _refused(
        builder, bundle_dir, "user: user 'ghost' is not in the image's /etc/passwd", user="ghost"
    )
    _refused(
        builder,
        bundle_dir,
        "user: group 'ghosts' is not in the image's /etc/group",
        user="app:ghosts",
    )
    _refused(builder, bundle_dir, "invalid user or group", user="a/b")
    _refused(builder, bundle_dir, "id 99999999999 is out of range", user="99999999999")


def test_passwd_is_not_read_through_a_link_out_of_the_rootfs(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    passwd = bundle_dir / "rootfs/etc/passwd"
    passwd.unlink()
    passwd.symlink_to("../../../../../../../etc/passwd")
    _refused(
        builder,
        bundle_dir,
        r"image.config.User: '/etc/passwd' resolves outside",
        ImageConfig(entrypoint=("/ep",), user="root"),
    )
    passwd.unlink()
    os.mkfifo(passwd)
    _refused(builder, bundle_dir, "neither a file nor a directory", user="root")


def test_oversized_passwd_is_refused(
    builder: BundleBuilder, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bundle, "MAX_USER_DB_SIZE", 16)
    _refused(
        builder,
        bundle_dir,
        "/etc/passwd in the image is over 16 bytes",
        error=ImageTooLarge,
        user="app",
    )


# --- capabilities, privileges ----------------------------------------------------------------


def test_default_capabilities_are_containerds(builder: BundleBuilder, bundle_dir: Path) -> None:
    caps = _build(builder, bundle_dir).spec["process"]["capabilities"]
    assert set(caps["bounding"]) == set(_bundle.DEFAULT_CAPABILITIES)
    assert caps["effective"] == caps["permitted"] == caps["bounding"]
    assert "inheritable" not in caps and "ambient" not in caps


def test_capabilities_add_and_drop(builder: BundleBuilder, bundle_dir: Path) -> None:
    caps = _build(
        builder, bundle_dir, capabilities_drop=["ALL"], capabilities_add=["net_bind_service"]
    ).spec["process"]["capabilities"]["bounding"]
    assert caps == ["CAP_NET_BIND_SERVICE"]
    seccomp = _build(builder, bundle_dir, capabilities_add=["SYS_PTRACE"]).spec["linux"]["seccomp"]
    assert "ptrace" in seccomp["syscalls"][0]["names"]


def test_unknown_capability_is_refused(builder: BundleBuilder, bundle_dir: Path) -> None:
    error = _refused(
        builder,
        bundle_dir,
        "capabilities_add: unknown capability 'CAP_FOO'",
        capabilities_add=["CAP_FOO"],
    )
    assert error.capability == "CAP_FOO"  # type: ignore[attr-defined]
    _refused(
        builder,
        bundle_dir,
        "capabilities_drop: unknown capability 'bogus'",
        capabilities_drop=["bogus"],
    )


def test_privileged_is_refused_unless_allowed(
    builder: BundleBuilder, bundle_dir: Path, paths: Paths
) -> None:
    _refused(builder, bundle_dir, "asks to be privileged", privileged=True)
    spec = _build(BundleBuilder(paths, allow_privileged=True), bundle_dir, privileged=True).spec
    assert "CAP_SYS_ADMIN" in spec["process"]["capabilities"]["bounding"]
    assert "seccomp" not in spec["linux"] and "maskedPaths" not in spec["linux"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_seccomp_refuses_namespace_clones_without_sys_admin(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    rules = _build(builder, bundle_dir).spec["linux"]["seccomp"]["syscalls"]
    clone = next(r for r in rules if r["names"] == ["clone"])
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" and clone["args"][0]["valueTwo"] == 0
    clone3 = next(r for r in rules if r["names"] == ["clone3"])
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    admin = _build(builder, bundle_dir, capabilities_add=["SYS_ADMIN"]).spec["linux"]["seccomp"]
    assert {"clone", "clone3", "mount"} <= set(admin["syscalls"][0]["names"])


# --- rlimits, resources ----------------------------------------------------------------------


def test_rlimit_above_the_host_hard_limit_is_capped(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    host_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if host_hard == resource.RLIM_INFINITY:
        pytest.skip("the open-files hard limit is unlimited here: nothing to cap")
    rlimits = _build(builder, bundle_dir, rlimits={"nofile": (10**9, 10**9)}).spec["process"][
        "rlimits"
    ]
    assert rlimits == [{"type": "RLIMIT_NOFILE", "hard": host_hard, "soft": host_hard}]


def test_default_rlimit_is_nofile_1024(builder: BundleBuilder, bundle_dir: Path) -> None:
    assert _build(builder, bundle_dir).spec["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}
    ]


@pytest.mark.parametrize(
    ("rlimits", "match"),
    [
        ({"nofile": (10, 5)}, r"rlimits\[nofile\]: malformed rlimit \(10, 5\)"),
        ({"nofile": (-1, 5)}, "malformed rlimit"),
        ({"nofile": 100}, "malformed rlimit 100"),
        ({"nofile": (True, 5)}, "malformed rlimit"),
        ({"RLIMIT_BOGUS": (1, 1)}, r"rlimits\[RLIMIT_BOGUS\]: unknown rlimit"),
    ],
)
def test_malformed_rlimit_is_refused(
    builder: BundleBuilder, bundle_dir: Path, rlimits: dict[str, Any], match: str
) -> None:
    _refused(builder, bundle_dir, match, rlimits=rlimits)


def test_memory_limits(builder: BundleBuilder, bundle_dir: Path) -> None:
    assert _build(builder, bundle_dir).spec["linux"]["resources"]["memory"] == {
        "limit": 256 * 2**20
    }
    _refused(
        builder,
        bundle_dir,
        rf"resources.memory_bytes: {MAX_MEMORY_BYTES + 1} is not between",
        resources=Resources(memory_bytes=MAX_MEMORY_BYTES + 1),
    )
    _refused(builder, bundle_dir, "is not between", resources=Resources(memory_bytes=1024))
    _refused(builder, bundle_dir, "cpu_millicores: 0 is not", resources=Resources(cpu_millicores=0))
    _refused(builder, bundle_dir, "pids_limit: -1 is not", resources=Resources(pids_limit=-1))


def test_small_cpu_requests_keep_the_kernel_minimums(
    builder: BundleBuilder, bundle_dir: Path
) -> None:
    cpu = _build(builder, bundle_dir, resources=Resources(cpu_millicores=1)).spec["linux"][
        "resources"
    ]["cpu"]
    assert cpu == {"shares": 2, "quota": 1000, "period": 100000}


# --- namespaces, mounts, sysctls, names ------------------------------------------------------


def test_joining_a_pods_namespaces(builder: BundleBuilder, bundle_dir: Path) -> None:
    spec = _build(builder, bundle_dir, namespaces={"uts": "/run/ns/uts", "cgroup": "/run/ns/cg"})
    assert spec.spec["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "network"},
        {"type": "ipc"},
        {"type": "uts", "path": "/run/ns/uts"},
        {"type": "mount"},
        {"type": "cgroup", "path": "/run/ns/cg"},
    ]
    assert "hostname" not in spec.spec  # the UTS namespace's owner set it
    _refused(builder, bundle_dir, r"namespaces\[user\]: cannot join", namespaces={"user": "/x"})
    _refused(builder, bundle_dir, "is not absolute", namespaces={"network": "ns/net"})


def test_extra_mounts_are_validated(builder: BundleBuilder, bundle_dir: Path) -> None:
    shm = Mount(destination="/dev/shm", source="/run/pod/shm", options=("rbind",))
    mounts = _build(builder, bundle_dir, mounts=[shm]).spec["mounts"]
    assert [m for m in mounts if m["destination"] == "/dev/shm"] == [
        {"destination": "/dev/shm", "type": "bind", "source": "/run/pod/shm", "options": ["rbind"]}
    ]
    for mount, match in [
        (Mount(destination="/proc/sys", type="tmpfs"), "covers /proc"),
        (Mount(destination="/a/../b", type="tmpfs"), "without '..'"),
        (Mount(destination="relative", type="tmpfs"), "must be an absolute path"),
        (Mount(destination="/d", source="rel"), "is not absolute"),
        (Mount(destination="/d", source="/x", options=("suid=1",)), "unsupported bind"),
        (Mount(destination="/d", type="tmpfs", options=("exec;rm",)), "unsupported tmpfs"),
        (Mount(destination="/d", type="overlay"), "unsupported mount type"),  # type: ignore[arg-type]
    ]:
        _refused(builder, bundle_dir, match, mounts=[mount])


def test_sysctls_must_be_namespaced(builder: BundleBuilder, bundle_dir: Path) -> None:
    spec = _build(builder, bundle_dir, sysctls={"kernel.shmmax": "1000", "fs.mqueue.msg_max": "5"})
    assert spec.spec["linux"]["sysctl"] == {"fs.mqueue.msg_max": "5", "kernel.shmmax": "1000"}
    _refused(
        builder,
        bundle_dir,
        r"sysctls\[kernel.panic\]: .* is not namespaced",
        sysctls={"kernel.panic": "1"},
    )
    _refused(builder, bundle_dir, "newline", sysctls={"net.core.somaxconn": "1\nkernel.x=1"})


def test_names_and_hostnames(builder: BundleBuilder, bundle_dir: Path, paths: Paths) -> None:
    assert _build(builder, bundle_dir, name="my_app.1").spec["hostname"] == "my-app-1"
    _refused(builder, bundle_dir, "name: invalid container name", name="../x")
    _refused(builder, bundle_dir, "hostname: invalid host name", hostname="-bad-")
    # Without bundle_dir, the bundle goes under the root's bundles directory.
    name = _name()
    bundle = builder.build_oci_bundle(
        None, ContainerConfig(name=name, command=["/ep"]), bundle_dir / "rootfs"
    )
    assert bundle.path == paths.bundles / name and bundle.config_path.is_file()
    assert bundle.spec["root"]["path"] == str(bundle_dir / "rootfs")


def test_two_roots_give_distinct_cgroups(short_tmp: Path, bundle_dir: Path) -> None:
    one = _build(BundleBuilder(Paths.resolve(short_tmp / "one")), bundle_dir, name="same")
    two = _build(BundleBuilder(Paths.resolve(short_tmp / "two")), bundle_dir, name="same")
    assert one.spec["linux"]["cgroupsPath"] != two.spec["linux"]["cgroupsPath"]


def test_missing_rootfs_is_an_invalid_bundle(builder: BundleBuilder, short_tmp: Path) -> None:
    with pytest.raises(InvalidBundle, match="is not a directory"):
        builder.build_oci_bundle(
            None, ContainerConfig(name=_name(), command=["/x"]), short_tmp / "none", short_tmp / "b"
        )
    assert not (short_tmp / "b").exists()


# --- Wasm bundles ----------------------------------------------------------------------------


def test_wasm_bundle_layout(builder: BundleBuilder, short_tmp: Path) -> None:
    module = short_tmp / "hello.wasm"
    module.write_bytes(WASM_MODULE)
    image = _image(ImageConfig(entrypoint=("/hello.wasm",), cmd=("--greet",)), kind="wasm")
    bundle = builder.build_wasm_bundle(
        image, ContainerConfig(name=_name(), env={"X": "1"}), module, short_tmp / "wb"
    )
    assert bundle.kind == "wasm" and bundle.module == short_tmp / "wb/rootfs/module.wasm"
    assert bundle.module.read_bytes() == WASM_MODULE
    assert bundle.module_digest == "sha256:" + hashlib.sha256(WASM_MODULE).hexdigest()
    spec = json.loads(bundle.config_path.read_text())
    assert spec["root"]["path"] == "rootfs"
    assert spec["process"]["args"] == ["/module.wasm", "--greet"]
    assert "X=1" in spec["process"]["env"]
    assert spec["annotations"]["run.oci.handler"] == "wasm"
    assert spec["annotations"]["io.magikrun.wasm.module.digest"] == bundle.module_digest
    wasmtime.Module(wasmtime.Engine(), bundle.module.read_bytes())  # still a valid module
    assert sorted(p.name for p in short_tmp.iterdir()) == ["hello.wasm", "root", "wb"]


def test_wasm_bundle_without_entrypoint_runs_the_module(
    builder: BundleBuilder, short_tmp: Path
) -> None:
    bundle = builder.build_wasm_bundle(
        None, ContainerConfig(name=_name(), args=["a"]), io.BytesIO(WASM_MODULE), short_tmp / "w"
    )
    assert bundle.spec["process"]["args"] == ["/module.wasm", "a"]


def _no_leftovers(parent: Path) -> None:
    assert list(parent.iterdir()) == []


def test_wasm_bundle_refuses_bad_modules_and_leaves_nothing(
    builder: BundleBuilder, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = short_tmp / "bundles"
    parent.mkdir()
    config = ContainerConfig(name=_name())
    with pytest.raises(BundleBuildFailed, match="module: not a WebAssembly module"):
        builder.build_wasm_bundle(None, config, io.BytesIO(b"\x7fELF" + b"\0" * 60), parent / "b")
    _no_leftovers(parent)
    monkeypatch.setattr(_bundle, "MAX_WASM_MODULE_SIZE", 64)
    with pytest.raises(ImageTooLarge, match="module: WebAssembly module is over 64 bytes"):
        builder.build_wasm_bundle(None, config, io.BytesIO(WASM_MODULE + b"\0" * 64), parent / "b")
    _no_leftovers(parent)
    with pytest.raises(BundleBuildFailed, match="working directory 'rel' is not absolute"):
        builder.build_wasm_bundle(
            None,
            ContainerConfig(name=_name(), working_dir="rel"),
            io.BytesIO(WASM_MODULE),
            parent / "b",
        )
    _no_leftovers(parent)
    (parent / "b").mkdir()
    (parent / "b/keep").write_text("x")
    with pytest.raises(InvalidBundle, match="exists and is not empty"):
        builder.build_wasm_bundle(None, config, io.BytesIO(WASM_MODULE), parent / "b")
    assert [p.name for p in (parent / "b").iterdir()] == ["keep"]


# --- finding the module in an image ----------------------------------------------------------


class _Blobs:
    """A dict of blobs by digest with the ContentStore.open shape."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, data: bytes, media_type: str) -> Layer:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return Layer(digest=digest, media_type=media_type, size=len(data), diff_id=digest)

    def open(self, digest: str) -> BinaryIO:
        return io.BytesIO(self.blobs[digest])


def _tar(entries: list[tuple[str, bytes | str | None]]) -> bytes:
    """Entries: (name, bytes) a file, (name, str) a symlink, (name, None) a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _no_module(image: Image, blobs: _Blobs, match: str) -> None:
    with pytest.raises(BundleBuildFailed, match=match), open_wasm_module(image, blobs.open):
        pytest.fail("a module was found")


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    OCI_LAYER_TAR: lambda data: data,
    OCI_LAYER_GZIP: gzip.compress,
    OCI_LAYER_ZSTD: lambda data: zstandard.ZstdCompressor().compress(data),
}


def test_module_from_a_wasm_layer() -> None:
    blobs = _Blobs()
    image = _image(ImageConfig(), (blobs.add(WASM_MODULE, WASM_LAYER),), kind="wasm")
    with open_wasm_module(image, blobs.open) as module:
        assert module.read() == WASM_MODULE
    _no_module(_image(ImageConfig(), image.layers * 2), blobs, "has 2 WebAssembly layers")


@pytest.mark.parametrize("media_type", list(COMPRESSORS))
def test_module_from_a_tar_layer_named_by_the_entrypoint(media_type: str) -> None:
    blobs = _Blobs()
    compress = COMPRESSORS[media_type]
    lower = blobs.add(compress(_tar([("app/", None), ("app/hello.wasm", b"old")])), media_type)
    upper = blobs.add(
        compress(_tar([("./app/other", b"x"), ("./app/hello.wasm", WASM_MODULE)])), media_type
    )
    image = _image(ImageConfig(entrypoint=("/app/hello.wasm",)), (lower, upper))
    with open_wasm_module(image, blobs.open) as module:
        assert module.read() == WASM_MODULE  # the upper layer's file wins


def test_whiteouts_hide_modules_of_lower_layers(builder: BundleBuilder, short_tmp: Path) -> None:
    blobs = _Blobs()
    lower = blobs.add(_tar([("app/hello.wasm", WASM_MODULE)]), OCI_LAYER_TAR)
    for whiteout in ("app/.wh.hello.wasm", ".wh.app", "app/.wh..wh..opq"):
        upper = blobs.add(_tar([(whiteout, b"")]), OCI_LAYER_TAR)
        image = _image(ImageConfig(cmd=("app/hello.wasm",)), (lower, upper))
        _no_module(image, blobs, "has no file app/hello.wasm")


def test_hostile_module_entries_are_refused() -> None:
    blobs = _Blobs()
    link = blobs.add(_tar([("hello.wasm", "/etc/shadow")]), OCI_LAYER_TAR)
    for entrypoint, match in [
        ("hello.wasm", "is not a regular file"),
        ("/../hello.wasm", "is not a path inside the image"),
        ("/bin/sh", "names no .wasm file"),
    ]:
        _no_module(_image(ImageConfig(entrypoint=(entrypoint,)), (link,)), blobs, match)
    corrupt = blobs.add(b"not a gzip stream", OCI_LAYER_GZIP)
    _no_module(
        _image(ImageConfig(entrypoint=("a.wasm",)), (corrupt,)), blobs, "cannot read a layer"
    )


def test_module_from_an_image_into_a_bundle(builder: BundleBuilder, short_tmp: Path) -> None:
    blobs = _Blobs()
    layer = blobs.add(gzip.compress(_tar([("srv/app.wasm", WASM_MODULE)])), OCI_LAYER_GZIP)
    image = _image(ImageConfig(entrypoint=("/srv/app.wasm", "serve")), (layer,))
    with open_wasm_module(image, blobs.open) as module:
        bundle = builder.build_wasm_bundle(image, ContainerConfig(name=_name()), module)
    assert bundle.spec["process"]["args"] == ["/module.wasm", "serve"]
    assert bundle.module is not None and bundle.module.read_bytes() == WASM_MODULE


def test_module_search_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = _Blobs()
    monkeypatch.setattr(_bundle, "MAX_FILES_PER_LAYER", 2)
    many = blobs.add(
        _tar([("a", b""), ("b", b""), ("c", b""), ("x.wasm", WASM_MODULE)]), OCI_LAYER_TAR
    )
    with pytest.raises(ImageTooLarge, match="has over 2 entries"):
        with open_wasm_module(_image(ImageConfig(entrypoint=("x.wasm",)), (many,)), blobs.open):
            pytest.fail("a module was found")
    monkeypatch.setattr(_bundle, "MAX_WASM_MODULE_SIZE", 8)
    layer = blobs.add(WASM_MODULE, WASM_LAYER)
    with pytest.raises(ImageTooLarge, match=f"module layer {layer.digest} is"):
        with open_wasm_module(_image(ImageConfig(), (layer,), kind="wasm"), blobs.open):
            pytest.fail("a module was found")
