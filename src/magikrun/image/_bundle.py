"""Bundles: a root filesystem plus the ``config.json`` an OCI runtime runs.

``BundleBuilder`` turns an image config (untrusted) and a ``ContainerConfig``
(the caller's) into a runtime-spec 1.0.2 ``config.json`` with containerd's
hardening defaults: new namespaces, a default capability set, a default-deny
seccomp profile, masked and read-only ``/proc`` paths, ``noNewPrivileges``,
rlimits capped at the host's hard limits and ``linux.resources`` that crun and
runc apply on cgroup v1 and v2 alike. Everything read from the image is
validated and every path is resolved inside the root filesystem, as the
container will see it, before any file is written.

A Wasm bundle is the same ``config.json`` over ``rootfs/module.wasm`` with the
annotation ``run.oci.handler: wasm`` and ``process.args[0]`` naming the module
inside ``root.path`` (crun's convention), so one runtime CLI runs both kinds.

Example::

    builder = BundleBuilder(Paths.resolve())
    bundle = builder.build_oci_bundle(
        image, ContainerConfig(name="web", args=["-p", "8080"]), rootfs, bundle_dir
    )
    await runtime.create("web", bundle.path)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

from .._fs import RootPath, open_resolved, resolve_in_root
from ..errors import (
    BundleBuildFailed,
    ImageTooLarge,
    InvalidBundle,
    PathTraversal,
    UnsafeLayer,
    UnsafeRootfsPath,
)
from ..platform._limits import (
    DEFAULT_MEMORY_BYTES,
    MAX_CONTAINER_ID_LEN,
    MAX_FILES_PER_LAYER,
    MAX_MEMORY_BYTES,
    MAX_USER_DB_SIZE,
    MAX_WASM_MODULE_SIZE,
    MIN_MEMORY_BYTES,
)
from ..platform._paths import Paths
from ._extract import ExtractBudget, open_layer_file
from ._mediatypes import WASM_LAYER
from ._model import Image, ImageConfig
from ._seccomp import default_seccomp_profile

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_RLIMITS",
    "WASM_MODULE_PATH",
    "Bundle",
    "BundleBuilder",
    "ContainerConfig",
    "Mount",
    "Resources",
    "open_wasm_module",
]

OCI_VERSION = "1.0.2"

ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
"""Every Linux capability, in kernel number order (the index is the number)."""

DEFAULT_CAPABILITIES: frozenset[str] = frozenset(
    {
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    }
)  # fmt: skip
"""containerd's default capability set."""

DEFAULT_RLIMITS: Mapping[str, tuple[int, int]] = {"RLIMIT_NOFILE": (1024, 1024)}
"""Rlimits every container gets unless ``ContainerConfig.rlimits`` says otherwise."""

RLIMIT_NAMES = frozenset(
    {
        "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE",
        "RLIMIT_LOCKS", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE",
        "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    }
)  # fmt: skip

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` for images that set none."""

CPU_PERIOD_US = 100_000
"""CFS period the CPU quota is expressed in (the kernel's default)."""
_MIN_CPU_QUOTA_US = 1_000
_MIN_CPU_SHARES = 2
_MAX_CPU_SHARES = 262_144
_MAX_CPU_MILLICORES = 1024 * 1000
_MAX_UID = 2**32 - 2
_MAX_RLIMIT = 2**64 - 1

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
"""containerd's masked paths: hidden from the container."""
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
"""containerd's read-only paths."""

NAMESPACES = ("pid", "network", "ipc", "uts", "mount")
"""Namespaces a container gets, new unless ``ContainerConfig.namespaces`` names one to join."""
_JOINABLE_NAMESPACES = frozenset({*NAMESPACES, "cgroup"})

WASM_MODULE_PATH = "/module.wasm"
"""Where a Wasm bundle holds its module, inside ``root.path``."""
WASM_ANNOTATIONS = {"run.oci.handler": "wasm", "module.wasm.image/variant": "compat"}
_WASM_MAGIC = b"\0asm"
_WASM_VERSIONS = (b"\x01\x00\x00\x00", b"\x0d\x00\x01\x00")
"""Core module version 1, and the component-model layer 1 preamble."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_USER_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SYSCTL_RE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_-]+)+")
_IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
        "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
    }
)  # fmt: skip
"""Sysctls that only affect the container's own IPC namespace."""
_BIND_OPTIONS = frozenset(
    {
        "bind", "rbind", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
        "private", "rprivate", "slave", "rslave", "shared", "rshared", "noatime",
        "relatime", "nodiratime",
    }
)  # fmt: skip
_TMPFS_FLAGS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "relatime"})
_TMPFS_VALUE_RE = re.compile(
    r"(size=[0-9]+[kmg%]?|nr_inodes=[0-9]+[kmg]?|mode=[0-7]{3,4}|"
    r"uid=[0-9]+|gid=[0-9]+)"
)
_FORBIDDEN_MOUNT_ROOTS = ("proc", "sys")
"""Kernel filesystems a mount or cwd must not cover (the CVE-2019-19921 class)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resources:
    """cgroup limits of one container."""

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    """Memory limit; at most ``MAX_MEMORY_BYTES``."""
    cpu_millicores: int | None = None
    """CPU as Kubernetes millicores: 500 is half a CPU. Becomes CFS quota/period and shares."""
    pids_limit: int | None = None
    """Processes and threads the container may have at once."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """An extra mount: a bind mount of a host path, or a tmpfs."""

    destination: str
    type: Literal["bind", "tmpfs"] = "bind"
    source: str = ""
    """Host path for a bind mount; ignored for tmpfs."""
    options: tuple[str, ...] = ()
    """``ro``, ``nosuid``, ... ; for tmpfs also ``size=``, ``mode=``, ``uid=``, ``gid=``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerConfig:
    """What the caller says about one container, merged over the image's config.

    ``command`` and ``args`` follow Kubernetes: ``command`` replaces the image's
    ENTRYPOINT (and drops its CMD), ``args`` replaces CMD. An empty sequence
    counts as not given, as in a Pod spec.
    """

    name: str
    """Names the default bundle directory and the cgroup (``/magikrun/<root tag>-<name>``),
    so it must be unique among the root's live containers: use the container id."""
    command: Sequence[str] | None = None
    args: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    """Merged over the image's ENV: a key given here wins."""
    working_dir: str | None = None
    user: str | None = None
    """``uid[:gid]`` or ``name[:group]``; names come from the rootfs /etc/passwd, /etc/group."""
    hostname: str | None = None
    """Defaults to the name (made a valid host name). Ignored when joining a UTS namespace."""
    readonly_rootfs: bool = False
    capabilities_add: Sequence[str] = ()
    """Names with or without ``CAP_``, any case; ``ALL`` for every capability."""
    capabilities_drop: Sequence[str] = ()
    """As ``capabilities_add``; ``ALL`` drops the defaults first, then adds apply."""
    no_new_privileges: bool = True
    privileged: bool = False
    """All capabilities, all devices, no seccomp, no masked paths. Refused unless the
    ``BundleBuilder`` was made with ``allow_privileged=True``."""
    resources: Resources = field(default_factory=Resources)
    namespaces: Mapping[str, str] = field(default_factory=dict)
    """Namespaces to join, OCI type (``network``, ``ipc``, ...) to path (``/proc/PID/ns/net``)."""
    mounts: Sequence[Mount] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """``RLIMIT_NOFILE`` or ``nofile`` to ``(soft, hard)``; hard values above the host's
    hard limit are lowered to it, since the runtime could not raise them."""
    sysctls: Mapping[str, str] = field(default_factory=dict)
    """Namespaced sysctls only: ``net.*``, IPC ``kernel.*`` ones and ``fs.mqueue.*``."""


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle directory ready for ``OciRuntime.create``."""

    path: Path
    kind: Literal["oci", "wasm"]
    rootfs: Path
    spec: dict[str, Any]
    """The runtime spec written to ``config.json``."""
    module_digest: str | None = None
    """For Wasm bundles, the sha256 digest of ``rootfs/module.wasm``."""

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def module(self) -> Path | None:
        """The module file of a Wasm bundle."""
        return self.rootfs / WASM_MODULE_PATH.lstrip("/") if self.kind == "wasm" else None


class BundleBuilder:
    """Builds OCI and Wasm bundles under one magikrun root.

    Builds are synchronous file work; call them through
    ``magikrun._threads.finish_in_thread`` from a loop that must stay responsive while
    a large module is copied (a pooled thread would keep the caller from forking monitors).

    Parameters:
        paths: the magikrun root; bundles default to ``paths.bundles / NAME`` and the
            container cgroups are named after the root so two roots never share one.
        allow_privileged: accept ``ContainerConfig(privileged=True)``.
    """

    def __init__(self, paths: Paths, *, allow_privileged: bool = False) -> None:
        self.paths = paths
        self.allow_privileged = allow_privileged
        self._cgroup_tag = hashlib.sha256(os.fsencode(paths.run)).hexdigest()[:8]

    def build_oci_bundle(
        self,
        image: Image | None,
        config: ContainerConfig,
        rootfs: Path,
        bundle_dir: Path | None = None,
    ) -> Bundle:
        """Write ``bundle_dir/config.json`` for ``rootfs`` (an unpacked or mounted image).

        ``image`` may be ``None`` for a rootfs that comes from no image (then
        ``command`` is required). ``root.path`` is relative when ``rootfs`` is
        ``bundle_dir/rootfs``. Nothing is written unless every check passes.
        """
        bundle_dir = self._bundle_dir(config, bundle_dir)
        rootfs = Path(rootfs).absolute()
        root_path = "rootfs" if rootfs == bundle_dir / "rootfs" else str(rootfs)
        image_config = image.config if image is not None else ImageConfig()
        with _open_rootfs(rootfs) as root_fd:
            spec = self._spec(image_config, config, root_fd, root_path, wasm=False)
        created = not bundle_dir.exists()
        try:
            bundle_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_config(bundle_dir, spec)
        except OSError as exc:
            if created:
                shutil.rmtree(bundle_dir, ignore_errors=True)
            raise InvalidBundle(
                f"cannot write the bundle in {bundle_dir}: {exc.strerror}",
                hint="check that the directory is writable and the disk has space",
                path=bundle_dir,
            ) from exc
        return Bundle(path=bundle_dir, kind="oci", rootfs=rootfs, spec=spec)

    def build_wasm_bundle(
        self,
        image: Image | None,
        config: ContainerConfig,
        module: BinaryIO | Path,
        bundle_dir: Path | None = None,
    ) -> Bundle:
        """Write a Wasm bundle: ``rootfs/module.wasm`` and its ``config.json``.

        ``module`` is a module file or a stream (e.g. from ``open_wasm_module``);
        at most ``MAX_WASM_MODULE_SIZE`` bytes are read. ``bundle_dir`` must not
        exist or be empty: the bundle is staged beside it and renamed into place,
        so a failed build leaves nothing.
        """
        bundle_dir = self._bundle_dir(config, bundle_dir)
        if bundle_dir.exists() and (not bundle_dir.is_dir() or any(bundle_dir.iterdir())):
            raise InvalidBundle(
                f"bundle directory {bundle_dir} exists and is not empty",
                hint="delete it or pick another bundle directory",
                path=bundle_dir,
            )
        image_config = image.config if image is not None else ImageConfig()
        bundle_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent))
        try:
            rootfs = staging / "rootfs"
            rootfs.mkdir(mode=0o755)
            digest = _copy_module(module, rootfs / WASM_MODULE_PATH.lstrip("/"))
            with _open_rootfs(rootfs) as root_fd:
                spec = self._spec(image_config, config, root_fd, "rootfs", wasm=True)
            spec["annotations"]["io.magikrun.wasm.module.digest"] = digest
            _write_config(staging, spec)
            os.rename(staging, bundle_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Bundle(
            path=bundle_dir,
            kind="wasm",
            rootfs=bundle_dir / "rootfs",
            spec=spec,
            module_digest=digest,
        )

    def _bundle_dir(self, config: ContainerConfig, bundle_dir: Path | None) -> Path:
        _check_name(config.name)
        return (
            Path(bundle_dir).absolute()
            if bundle_dir is not None
            else (self.paths.bundles / config.name)
        )

    def _spec(
        self,
        image: ImageConfig,
        config: ContainerConfig,
        root_fd: int,
        root_path: str,
        *,
        wasm: bool,
    ) -> dict[str, Any]:
        if config.privileged and not self.allow_privileged:
            raise BundleBuildFailed(
                f"container {config.name!r} asks to be privileged",
                hint="privileged containers see the host's devices and kernel; create the "
                "BundleBuilder with allow_privileged=True only for trusted workloads",
                field="privileged",
            )
        argv = _wasm_argv(_argv(image, config)) if wasm else _require_program(_argv(image, config))
        env = _env(image, config)
        cwd, cwd_field = (
            (config.working_dir, "working_dir")
            if config.working_dir
            else (image.working_dir or "/", "image.config.WorkingDir")
        )
        cwd = _resolve_cwd(root_fd, cwd, cwd_field)
        user = _user(
            root_fd, *((config.user, "user") if config.user else (image.user, "image.config.User"))
        )
        capabilities = _capabilities(config)
        joined = _namespaces_to_join(config.namespaces)
        process: dict[str, Any] = {
            "terminal": False,
            "user": user,
            "args": argv,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities if user["uid"] == 0 else [],
                "permitted": capabilities if user["uid"] == 0 else [],
            },
            "rlimits": _rlimits(config.rlimits),
            "noNewPrivileges": config.no_new_privileges,
        }
        linux: dict[str, Any] = {
            "namespaces": [
                {"type": kind, "path": joined[kind]} if kind in joined else {"type": kind}
                for kind in (*NAMESPACES, *sorted(set(joined) - set(NAMESPACES)))
            ],
            "cgroupsPath": f"/magikrun/{self._cgroup_tag}-{config.name}",
            "resources": _resources(config.resources, privileged=config.privileged),
        }
        if not config.privileged:
            linux["maskedPaths"] = list(MASKED_PATHS)
            linux["readonlyPaths"] = list(READONLY_PATHS)
            linux["seccomp"] = default_seccomp_profile(capabilities)
        sysctls = _sysctls(config.sysctls)
        if sysctls:
            linux["sysctl"] = sysctls
        spec: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "process": process,
            "root": {"path": root_path, "readonly": config.readonly_rootfs},
        }
        if "uts" not in joined:
            spec["hostname"] = _hostname(config)
        spec["mounts"] = _mounts(config.mounts, privileged=config.privileged)
        spec["annotations"] = {
            **_annotations(config.annotations),
            **(WASM_ANNOTATIONS if wasm else {}),
        }
        spec["linux"] = linux
        return spec


def _fail(field_name: str, message: str, hint: str, **subject: Any) -> BundleBuildFailed:
    return BundleBuildFailed(f"{field_name}: {message}", hint=hint, field=field_name, **subject)


def _check_name(name: str) -> None:
    if not (
        isinstance(name, str) and len(name) <= MAX_CONTAINER_ID_LEN and _NAME_RE.fullmatch(name)
    ):
        raise _fail(
            "name",
            f"invalid container name {name!r}",
            f"use 1-{MAX_CONTAINER_ID_LEN} letters, digits, '_', '.' and '-', "
            "starting with a letter or digit",
        )


def _check_text(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise _fail(
            field_name, f"expected a string, got {type(value).__name__}", "pass text values"
        )
    if "\0" in value:
        raise _fail(
            field_name,
            f"{value!r} contains a NUL byte",
            "NUL cannot be passed to a process; remove it",
        )
    return value


def _strings(values: Sequence[str] | None, field_name: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str | bytes):
        raise _fail(
            field_name,
            "expected a list of strings, got one string",
            f"pass [{values!r}] or split the words yourself",
        )
    return [_check_text(value, f"{field_name}[{i}]") for i, value in enumerate(values)]


def _argv(image: ImageConfig, config: ContainerConfig) -> list[str]:
    """Kubernetes semantics: command replaces ENTRYPOINT+CMD, args replaces CMD."""
    entrypoint = _strings(image.entrypoint, "image.config.Entrypoint")
    cmd = _strings(image.cmd, "image.config.Cmd")
    command = _strings(config.command, "command")
    args = _strings(config.args, "args")
    return (command or entrypoint) + (args or ([] if command else cmd))


def _require_program(argv: list[str]) -> list[str]:
    if not argv or not argv[0]:
        raise _fail(
            "command",
            "the process has no program to run",
            "the image sets no ENTRYPOINT or CMD; pass command=[...]",
        )
    return argv


def _wasm_argv(argv: list[str]) -> list[str]:
    """argv[0] names the module (crun's convention); an argv[0] that named the module
    inside the image is replaced, otherwise argv (possibly empty) is the module's arguments."""
    if argv and argv[0].endswith(".wasm"):
        return [WASM_MODULE_PATH, *argv[1:]]
    return [WASM_MODULE_PATH, *argv]


def _env_entry(entry: str, field_name: str) -> tuple[str, str]:
    key, sep, value = _check_text(entry, field_name).partition("=")
    if not sep or not _ENV_KEY_RE.fullmatch(key):
        raise _fail(
            field_name,
            f"invalid environment entry {entry!r}",
            "entries are KEY=VALUE with KEY of letters, digits, '_', '.', '-', "
            "not starting with a digit",
        )
    return key, value


def _env(image: ImageConfig, config: ContainerConfig) -> list[str]:
    merged: dict[str, str] = {}
    for i, entry in enumerate(_strings(image.env, "image.config.Env")):
        key, value = _env_entry(entry, f"image.config.Env[{i}]")
        merged[key] = value
    for key, value in config.env.items():
        _env_entry(f"{_check_text(key, 'env')}={_check_text(value, f'env[{key}]')}", f"env[{key}]")
        merged[key] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    return [f"{key}={value}" for key, value in merged.items()]


@contextlib.contextmanager
def _open_rootfs(rootfs: Path) -> Iterator[int]:
    try:
        fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidBundle(
            f"root filesystem {rootfs} is not a directory: {exc.strerror}",
            hint="unpack or mount the image's layers there first",
            path=rootfs,
        ) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _resolve_in_root(root_fd: int, path: str, field_name: str) -> RootPath:
    """``resolve_in_root`` with its refusals, and anything but a file or directory, as
    errors of ``field_name``."""
    try:
        resolved = resolve_in_root(root_fd, path)
    except UnsafeRootfsPath as exc:
        raise _fail(field_name, exc.message, exc.hint, path=path) from exc
    if resolved.kind == "other":
        raise _fail(
            field_name,
            f"{path!r} is neither a file nor a directory",
            "use a path to a regular file or directory",
            path=path,
        )
    return resolved


def _resolve_cwd(root_fd: int, cwd: str, field_name: str) -> str:
    _check_text(cwd, field_name)
    if not cwd.startswith("/"):
        raise _fail(
            field_name,
            f"working directory {cwd!r} is not absolute",
            "use an absolute path such as /app",
            path=cwd,
        )
    resolved = _resolve_in_root(root_fd, cwd, field_name)
    if resolved.kind == "file":
        raise _fail(field_name, f"working directory {cwd!r} is a file", "use a directory", path=cwd)
    if resolved.parts and resolved.parts[0] in _FORBIDDEN_MOUNT_ROOTS:
        raise _fail(
            field_name,
            f"working directory {cwd!r} resolves into /{resolved.parts[0]}",
            "a working directory in a kernel filesystem can expose the host; use another",
            path=cwd,
        )
    return resolved.path


def _read_in_root(root_fd: int, path: str, field_name: str) -> str | None:
    """The text of a regular file inside the root, or None if it does not exist."""
    resolved = _resolve_in_root(root_fd, path, field_name)
    if resolved.kind != "file":
        return None
    fd = open_resolved(root_fd, resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        data = file.read(MAX_USER_DB_SIZE + 1)
    if len(data) > MAX_USER_DB_SIZE:
        raise ImageTooLarge(
            f"{field_name}: {path} in the image is over {MAX_USER_DB_SIZE} bytes",
            hint="the image is malformed or hostile; use a numeric uid:gid",
            field=field_name,
            path=path,
        )
    return data.decode("utf-8", "replace")


def _db_entries(text: str | None, min_fields: int) -> Iterator[list[str]]:
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= min_fields and fields[2].isdigit():
            yield fields


def _id(text: str, field_name: str) -> int:
    value = int(text)
    if value > _MAX_UID:
        raise _fail(
            field_name, f"id {value} is out of range", f"use an id between 0 and {_MAX_UID}"
        )
    return value


def _user(root_fd: int, spec: str, field_name: str) -> dict[str, Any]:
    """``uid[:gid]`` or names, resolved like Docker: a bare uid takes its passwd gid (or 0)."""
    _check_text(spec, field_name)
    user_part, _, group_part = spec.partition(":")
    user_part = user_part or "0"
    for part in (user_part, group_part):
        if part and not part.isdigit() and not _USER_NAME_RE.fullmatch(part):
            raise _fail(
                field_name,
                f"invalid user or group {part!r}",
                "use uid[:gid] or name[:group]",
                user=spec,
            )
    passwd = _db_entries(_read_in_root(root_fd, "/etc/passwd", field_name), 4)
    name: str | None = None
    if user_part.isdigit():
        uid = _id(user_part, field_name)
        entry = next((e for e in passwd if int(e[2]) == uid), None)
    else:
        entry = next((e for e in passwd if e[0] == user_part), None)
        if entry is None:
            raise _fail(
                field_name,
                f"user {user_part!r} is not in the image's /etc/passwd",
                "use a numeric uid or a user the image defines",
                user=spec,
            )
        name, uid = user_part, _id(entry[2], field_name)
    gid = _id(entry[3], field_name) if entry is not None and entry[3].isdigit() else 0
    additional: list[int] = []
    if group_part or name is not None:
        groups = list(_db_entries(_read_in_root(root_fd, "/etc/group", field_name), 3))
        if group_part.isdigit():
            gid = _id(group_part, field_name)
        elif group_part:
            group = next((g for g in groups if g[0] == group_part), None)
            if group is None:
                raise _fail(
                    field_name,
                    f"group {group_part!r} is not in the image's /etc/group",
                    "use a numeric gid or a group the image defines",
                    user=spec,
                )
            gid = _id(group[2], field_name)
        if name is not None:
            additional = sorted(
                {
                    _id(g[2], field_name)
                    for g in groups
                    if len(g) >= 4 and name in g[3].split(",") and int(g[2]) != gid
                }
            )
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional:
        user["additionalGids"] = additional
    return user


def _capability_name(raw: str, field_name: str) -> str:
    name = _check_text(raw, field_name).strip().upper()
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name not in ALL_CAPABILITIES:
        raise _fail(
            field_name,
            f"unknown capability {raw!r}",
            "use names such as NET_ADMIN or CAP_SYS_TIME (see capabilities(7))",
            capability=raw,
        )
    return name


def _host_capabilities() -> tuple[str, ...]:
    """The capabilities this kernel knows (``ALL`` means these)."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as file:
        last = int(file.read())
    return ALL_CAPABILITIES[: last + 1]


def _capabilities(config: ContainerConfig) -> list[str]:
    adds = _strings(config.capabilities_add, "capabilities_add")
    drops = _strings(config.capabilities_drop, "capabilities_drop")
    held = set(_host_capabilities()) if config.privileged else set(DEFAULT_CAPABILITIES)
    if any(d.strip().upper() == "ALL" for d in drops):
        held.clear()
    else:
        held -= {_capability_name(d, "capabilities_drop") for d in drops}
    for add in adds:
        if add.strip().upper() == "ALL":
            held |= set(_host_capabilities())
            continue
        name = _capability_name(add, "capabilities_add")
        if name not in _host_capabilities():
            raise _fail(
                "capabilities_add",
                f"this kernel has no {name}",
                "drop it from capabilities_add",
                capability=add,
            )
        held.add(name)
    return [cap for cap in ALL_CAPABILITIES if cap in held]


def _rlimits(requested: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    merged = dict(DEFAULT_RLIMITS)
    for raw, value in requested.items():
        name = _check_text(raw, "rlimits").upper()
        name = name if name.startswith("RLIMIT_") else f"RLIMIT_{name}"
        field_name = f"rlimits[{raw}]"
        if name not in RLIMIT_NAMES:
            raise _fail(
                field_name,
                f"unknown rlimit {raw!r}",
                "use a name from setrlimit(2) such as RLIMIT_NOFILE or nofile",
            )
        if not (
            isinstance(value, tuple)
            and len(value) == 2
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_RLIMIT
                for v in value
            )
            and value[0] <= value[1]
        ):
            raise _fail(
                field_name,
                f"malformed rlimit {value!r}",
                "give (soft, hard) as non-negative integers with soft <= hard",
            )
        merged[name] = value
    rlimits = []
    for name in sorted(merged):
        soft, hard = merged[name]
        host_hard = resource.getrlimit(getattr(resource, name))[1]
        if host_hard != resource.RLIM_INFINITY:
            hard = min(hard, host_hard)
            soft = min(soft, hard)
        rlimits.append({"type": name, "hard": hard, "soft": soft})
    return rlimits


def _positive(value: object, field_name: str, maximum: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise _fail(
            field_name,
            f"{value!r} is not between {minimum} and {maximum}",
            f"use an integer from {minimum} to {maximum}",
        )
    return value


def _resources(res: Resources, *, privileged: bool) -> dict[str, Any]:
    memory = _positive(
        res.memory_bytes, "resources.memory_bytes", MAX_MEMORY_BYTES, MIN_MEMORY_BYTES
    )
    out: dict[str, Any] = {
        "devices": [{"allow": privileged, "access": "rwm"}],
        "memory": {"limit": memory},
    }
    if res.cpu_millicores is not None:
        milli = _positive(res.cpu_millicores, "resources.cpu_millicores", _MAX_CPU_MILLICORES)
        out["cpu"] = {
            "shares": min(max(milli * 1024 // 1000, _MIN_CPU_SHARES), _MAX_CPU_SHARES),
            "quota": max(milli * CPU_PERIOD_US // 1000, _MIN_CPU_QUOTA_US),
            "period": CPU_PERIOD_US,
        }
    if res.pids_limit is not None:
        out["pids"] = {"limit": _positive(res.pids_limit, "resources.pids_limit", 2**22)}
    return out


def _namespaces_to_join(requested: Mapping[str, str]) -> dict[str, str]:
    joined = {}
    for kind, path in requested.items():
        field_name = f"namespaces[{kind}]"
        if kind not in _JOINABLE_NAMESPACES:
            raise _fail(
                field_name,
                f"cannot join a {kind!r} namespace",
                f"use one of {', '.join(sorted(_JOINABLE_NAMESPACES))}",
            )
        if not _check_text(path, field_name).startswith("/"):
            raise _fail(
                field_name,
                f"namespace path {path!r} is not absolute",
                "use a path such as /proc/PID/ns/net or a bind-mounted ns file",
            )
        joined[kind] = path
    return joined


def _hostname(config: ContainerConfig) -> str:
    if config.hostname is None:
        return re.sub(r"[^A-Za-z0-9-]", "-", config.name)[:63].strip("-") or "container"
    hostname = _check_text(config.hostname, "hostname")
    if len(hostname) > 253 or not all(
        _HOST_LABEL_RE.fullmatch(label) for label in hostname.split(".")
    ):
        raise _fail(
            "hostname",
            f"invalid host name {hostname!r}",
            "use RFC 1123 labels: letters, digits and '-', dot-separated",
        )
    return hostname


def _mount_destination(dest: str, field_name: str) -> str:
    _check_text(dest, field_name)
    parts = PurePosixPath(dest).parts
    if not dest.startswith("/") or ".." in parts or len(parts) < 2:
        raise _fail(
            field_name,
            f"mount destination {dest!r} must be an absolute path below / without '..'",
            "use a path such as /data",
        )
    if parts[1] in _FORBIDDEN_MOUNT_ROOTS:
        raise _fail(
            field_name,
            f"mount destination {dest!r} covers /{parts[1]}",
            "mounting over kernel filesystems can expose the host; pick another destination",
        )
    return str(PurePosixPath(dest))


def _extra_mount(mount: Mount, index: int) -> dict[str, Any]:
    field_name = f"mounts[{index}]"
    dest = _mount_destination(mount.destination, f"{field_name}.destination")
    options = _strings(mount.options, f"{field_name}.options")
    if mount.type == "bind":
        source = _check_text(mount.source, f"{field_name}.source")
        if not source.startswith("/"):
            raise _fail(
                f"{field_name}.source",
                f"bind source {source!r} is not absolute",
                "use an absolute host path",
            )
        bad = [opt for opt in options if opt not in _BIND_OPTIONS]
        if bad:
            raise _fail(
                f"{field_name}.options",
                f"unsupported bind mount options {bad}",
                f"use {', '.join(sorted(_BIND_OPTIONS))}",
            )
        if not {"bind", "rbind"} & set(options):
            options.append("rbind")
        return {"destination": dest, "type": "bind", "source": source, "options": options}
    if mount.type == "tmpfs":
        bad = [o for o in options if o not in _TMPFS_FLAGS and not _TMPFS_VALUE_RE.fullmatch(o)]
        if bad:
            raise _fail(
                f"{field_name}.options",
                f"unsupported tmpfs options {bad}",
                f"use size=, mode=, uid=, gid=, nr_inodes= and {', '.join(sorted(_TMPFS_FLAGS))}",
            )
        return {"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": options}
    raise _fail(
        f"{field_name}.type", f"unsupported mount type {mount.type!r}", "use 'bind' or 'tmpfs'"
    )


def _default_mounts(*, privileged: bool) -> list[dict[str, Any]]:
    """containerd's default mounts; /sys and the cgroup tree are read-only unless privileged."""
    sys_mode = "rw" if privileged else "ro"
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", sys_mode],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", sys_mode],
        },
    ]


def _mounts(extra: Sequence[Mount], *, privileged: bool) -> list[dict[str, Any]]:
    """Defaults, then the extra mounts; an extra mount on a default's destination
    (a pod's shared /dev/shm) replaces that default."""
    if isinstance(extra, Mount):
        raise _fail("mounts", "expected a list of Mount, got one Mount", "pass [mount]")
    mounts = [_extra_mount(m, i) for i, m in enumerate(extra)]
    taken = {m["destination"] for m in mounts}
    return [
        m for m in _default_mounts(privileged=privileged) if m["destination"] not in taken
    ] + mounts


def _sysctls(requested: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in requested.items():
        field_name = f"sysctls[{name}]"
        _check_text(name, field_name)
        if not _SYSCTL_RE.fullmatch(name) or not (
            name in _IPC_SYSCTLS or name.startswith(("net.", "fs.mqueue."))
        ):
            raise _fail(
                field_name,
                f"sysctl {name!r} is not namespaced",
                "only net.*, fs.mqueue.* and the IPC kernel.* sysctls are per container",
            )
        if "\n" in _check_text(value, field_name):
            raise _fail(field_name, "the value contains a newline", "use a one-line value")
        out[name] = value
    return dict(sorted(out.items()))


def _annotations(requested: Mapping[str, str]) -> dict[str, str]:
    for key, value in requested.items():
        _check_text(key, "annotations")
        _check_text(value, f"annotations[{key}]")
        if not key:
            raise _fail("annotations", "empty annotation key", "use keys like example.com/key")
    return dict(sorted(requested.items()))


def _write_config(bundle_dir: Path, spec: dict[str, Any]) -> None:
    """Write config.json through a temp file and a rename, relative to the directory fd."""
    data = (json.dumps(spec, indent=2) + "\n").encode()
    dir_fd = os.open(bundle_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    tmp = f".config.json.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, "config.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def _copy_module(module: BinaryIO | Path, dest: Path) -> str:
    """Copy at most MAX_WASM_MODULE_SIZE bytes, checking the Wasm preamble; the digest."""
    with contextlib.ExitStack() as stack:
        source: BinaryIO = (
            stack.enter_context(open(module, "rb")) if isinstance(module, Path) else module
        )
        out = stack.enter_context(open(dest, "xb"))
        digest = hashlib.sha256()
        total = 0
        head = source.read(8)
        if len(head) < 8 or head[:4] != _WASM_MAGIC or head[4:] not in _WASM_VERSIONS:
            raise BundleBuildFailed(
                "module: not a WebAssembly module (bad magic or version)",
                hint="pass a .wasm binary module or component",
                field="module",
            )
        chunk = head
        while chunk:
            total += len(chunk)
            if total > MAX_WASM_MODULE_SIZE:
                raise ImageTooLarge(
                    f"module: WebAssembly module is over {MAX_WASM_MODULE_SIZE} bytes",
                    hint="the image is malformed or too large for magikrun",
                    field="module",
                )
            digest.update(chunk)
            out.write(chunk)
            chunk = source.read(1 << 20)
        out.flush()
        os.fsync(out.fileno())
    return f"sha256:{digest.hexdigest()}"


@contextlib.contextmanager
def open_wasm_module(image: Image, open_blob: Callable[[str], BinaryIO]) -> Iterator[BinaryIO]:
    """Open the WebAssembly module of ``image`` for ``BundleBuilder.build_wasm_bundle``.

    The module is the image's one ``application/vnd.wasm.content.layer.v1+wasm``
    layer, or else the regular file that the image's ENTRYPOINT/CMD ``argv[0]``
    names inside its tar layers (topmost layer first, honouring whiteouts).
    Tar layers are only read here, never extracted.

    Parameters:
        image: the image, as the store knows it.
        open_blob: opens a blob by digest, e.g. ``ContentStore.open``.
    """
    wasm_layers = [layer for layer in image.layers if layer.media_type == WASM_LAYER]
    if len(wasm_layers) > 1:
        raise BundleBuildFailed(
            f"image {image.reference} has {len(wasm_layers)} WebAssembly layers",
            hint="magikrun runs images with exactly one module layer",
            field="layers",
        )
    if wasm_layers:
        layer = wasm_layers[0]
        if layer.size > MAX_WASM_MODULE_SIZE:
            raise ImageTooLarge(
                f"module layer {layer.digest} is {layer.size} bytes, over {MAX_WASM_MODULE_SIZE}",
                hint="the image is too large for magikrun",
                digest=layer.digest,
            )
        with open_blob(layer.digest) as blob:
            yield blob
        return
    argv = [*image.config.entrypoint, *image.config.cmd]
    if not argv or not argv[0].endswith(".wasm"):
        raise BundleBuildFailed(
            f"image {image.reference} has no WebAssembly layer and its entrypoint names "
            "no .wasm file",
            hint='build the image with a wasm layer or ENTRYPOINT ["/app.wasm"]',
            field="image.config.Entrypoint",
        )
    budget = ExtractBudget(max_files_per_layer=MAX_FILES_PER_LAYER)
    try:
        with open_layer_file(image.layers, open_blob, argv[0], budget=budget) as found:
            if found is None:
                raise BundleBuildFailed(
                    f"image {image.reference} has no file {argv[0]} for its entrypoint",
                    hint="check the image's ENTRYPOINT and layers",
                    field="image.config.Entrypoint",
                )
            if found.file is None:
                raise BundleBuildFailed(
                    f"{argv[0]} in layer {found.layer.digest} is not a regular file",
                    hint="the module must be a plain file in the image, not a link",
                    field="image.config.Entrypoint",
                )
            yield found.file
    except PathTraversal as exc:
        raise BundleBuildFailed(
            f"image.config.Entrypoint: {argv[0]!r} is not a path inside the image",
            hint="the image is malformed or hostile",
            field="image.config.Entrypoint",
        ) from exc
    except UnsafeLayer as exc:
        raise BundleBuildFailed(
            f"cannot read a layer of the image: {exc}",
            hint="the image is corrupt; pull it again",
            field="layers",
        ) from exc
