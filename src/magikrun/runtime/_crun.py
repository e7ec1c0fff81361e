"""Native Linux containers through crun (or runc), with magikrun's own state.

magikrun checks the bundle, keeps the container record and runs a monitor per
container; crun does the isolation (namespaces, pivot_root, seccomp,
capabilities, cgroups) with its own ``--root`` under ``paths.oci_root`` and the
cgroupfs manager. Every crun/runc failure becomes a magikrun error in
:func:`_raise_for`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import _process
from .._fs import resolve_in_root
from ..errors import (
    BackendFailed,
    ContainerNotFound,
    CreateFailed,
    InvalidArgument,
    InvalidBundle,
    InvalidState,
    MagikrunError,
    RuntimeUnavailable,
    UnsafeRootfsPath,
)
from ..platform._limits import (
    CONTAINER_START_TIMEOUT,
    EXEC_TIMEOUT,
    MAX_CONFIG_SIZE,
    MAX_CONTAINERS,
)
from ..platform._paths import Paths
from ._monitor import MonitorSpec
from ._store import (
    ContainerRecord,
    ContainerStore,
    validate_container_id,
)
from ._types import ContainerState, ContainerStatus, ExecResult, parse_signal

__all__ = ["NativeRuntime", "ensure_cgroup_compat", "load_bundle_config"]

log = logging.getLogger("magikrun.runtime")

OCI_BINARIES = ("crun", "runc")
"""The OCI runtimes NativeRuntime can drive, in order of preference."""

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_MONITOR_EXIT_WAIT = 10.0
"""Seconds delete waits for a monitor to record the exit of a killed container."""

_CAPABILITIES = frozenset(
    "CAP_" + name
    for name in (
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
        "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
        "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
        "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
        "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
        "CHECKPOINT_RESTORE"
    ).split()
)
_CAP_SYS_RESOURCE_BIT = 24


# ---------------------------------------------------------------------------- bundle checks


def _bad(bundle: Path, message: str, hint: str) -> NoReturn:
    raise InvalidBundle(message, hint=hint, bundle=str(bundle))


def load_bundle_config(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a bundle's ``config.json`` before any runtime sees it.

    Refuses (with `InvalidBundle`) a missing or oversized config, a missing
    rootfs, a ``process.cwd`` that is relative or leaves the rootfs, unknown
    capabilities, and rlimits that are malformed or above what this host allows.
    """
    path = Path(bundle).absolute()
    try:
        fd = os.open(path / "config.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _bad(path, f"{path} has no config.json", "pass the bundle directory that holds config.json")
    except OSError as exc:
        _bad(path, f"cannot open {path}/config.json: {exc.strerror}", "check the bundle path")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            _bad(path, f"{path}/config.json is not a regular file", "write config.json as a file")
        raw = f.read(MAX_CONFIG_SIZE + 1)
    if len(raw) > MAX_CONFIG_SIZE:
        _bad(path, f"{path}/config.json is over {MAX_CONFIG_SIZE} bytes", "shrink config.json")
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        _bad(path, f"{path}/config.json is not valid JSON: {exc}", "fix the JSON syntax")
    if not isinstance(spec, dict):
        _bad(path, "config.json must hold a JSON object", "see the OCI runtime spec")
    _check_root(path, spec)
    process = spec.get("process")
    if not isinstance(process, dict):
        _bad(path, "config.json has no 'process' object", "add process.args, cwd and env")
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        _bad(path, "process.args must be a non-empty list of strings", "set process.args")
    _check_cwd(path, spec, process.get("cwd"))
    _check_capabilities(path, process.get("capabilities"))
    _check_rlimits(path, process.get("rlimits"))
    annotations = spec.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        _bad(path, "annotations must map strings to strings", "fix config.json annotations")
    return spec


def rootfs_of(bundle: Path, spec: Mapping[str, Any]) -> Path:
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        _bad(bundle, "config.json has no root.path", "set root.path to the rootfs directory")
    return bundle / str(root["path"])


def _check_root(bundle: Path, spec: Mapping[str, Any]) -> None:
    rootfs = rootfs_of(bundle, spec)
    if not rootfs.is_dir():
        _bad(bundle, f"root.path {rootfs} is not a directory", "extract or mount the rootfs first")


def _check_cwd(bundle: Path, spec: Mapping[str, Any], cwd: object) -> None:
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        _bad(bundle, f"process.cwd {cwd!r} must be an absolute path", "set process.cwd, e.g. '/'")
    root_fd = os.open(rootfs_of(bundle, spec), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        resolved = resolve_in_root(root_fd, cwd).path
    except UnsafeRootfsPath as exc:
        if exc.reason == "escape":
            _bad(
                bundle,
                f"process.cwd {cwd!r} leaves the container's root filesystem",
                "use a working directory inside the rootfs",
            )
        _bad(bundle, f"process.cwd {exc.message}", exc.hint)
    finally:
        os.close(root_fd)
    if resolved.startswith("/proc/"):
        _bad(bundle, f"process.cwd {cwd!r} points into /proc", "use a directory of the rootfs")


def _check_capabilities(bundle: Path, caps: object) -> None:
    if caps is None:
        return
    if not isinstance(caps, dict):
        _bad(bundle, "process.capabilities must be an object", "see the OCI runtime spec")
    for kind, names in caps.items():
        if not isinstance(names, list):
            _bad(bundle, f"process.capabilities.{kind} must be a list", "list CAP_* names")
        unknown = sorted(str(n) for n in names if n not in _CAPABILITIES)
        if unknown:
            _bad(
                bundle,
                f"unknown capabilities in process.capabilities.{kind}: {', '.join(unknown)}",
                "use Linux capability names such as CAP_NET_BIND_SERVICE",
            )


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE_BIT & 1)
    return False


def _check_rlimits(bundle: Path, rlimits: object) -> None:
    if rlimits is None:
        return
    if not isinstance(rlimits, list):
        _bad(bundle, "process.rlimits must be a list", "see the OCI runtime spec")
    privileged = None
    for entry in rlimits:
        kind = entry.get("type") if isinstance(entry, dict) else None
        number = getattr(resource, kind, None) if isinstance(kind, str) else None
        if not isinstance(kind, str) or not kind.startswith("RLIMIT_") or number is None:
            _bad(bundle, f"unknown rlimit {kind!r}", "use names such as RLIMIT_NOFILE")
        soft, hard = entry.get("soft"), entry.get("hard")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (soft, hard)):
            _bad(bundle, f"{kind} needs non-negative integer soft and hard", "fix the rlimit")
        assert isinstance(soft, int) and isinstance(hard, int)
        if soft > hard:
            _bad(bundle, f"{kind}: soft {soft} is above hard {hard}", "make soft <= hard")
        host_hard = resource.getrlimit(number)[1]
        if host_hard != resource.RLIM_INFINITY and hard > host_hard:
            privileged = _has_cap_sys_resource() if privileged is None else privileged
            if not privileged:
                _bad(
                    bundle,
                    f"{kind}: hard limit {hard} is above this host's hard limit {host_hard}",
                    f"cap {kind} at {host_hard}: without CAP_SYS_RESOURCE it cannot be raised",
                )


# ------------------------------------------------------------------------ cgroup hybrid fix


def _hybrid_v2_controllers(cgroup_root: Path) -> list[str]:
    """Controllers that cgroup2 holds on a host whose other controllers are cgroup v1.

    crun 1.8 refuses such "hybrid" hosts; each of these needs its v1 hierarchy.
    """
    controllers = cgroup_root / "unified" / "cgroup.controllers"
    if not controllers.exists() or not (cgroup_root / "memory").is_dir():
        return []
    return controllers.read_text().split()


async def ensure_cgroup_compat(cgroup_root: Path = _CGROUP_ROOT) -> str | None:
    """Make a hybrid cgroup host usable for crun; what was changed, or ``None``.

    Mounts the v1 hierarchy of each controller that cgroup2 holds (``hugetlb`` on
    this kind of machine) at ``<cgroup_root>/<name>``. Raises `RuntimeUnavailable`
    when that is needed but fails.
    """
    controllers = _hybrid_v2_controllers(cgroup_root)
    if not controllers:
        return None
    changed = []
    for name in controllers:
        target = cgroup_root / name
        target.mkdir(exist_ok=True)
        done = await _process.run(["mount", "-t", "cgroup", "-o", name, "cgroup", str(target)])
        if done.returncode != 0:
            raise RuntimeUnavailable(
                f"crun cannot run on this hybrid cgroup host (cgroup2 holds {name}) and mounting "
                f"the {name} cgroup v1 hierarchy failed: {done.stderr.decode().strip()}",
                hint="run magikrun as root once, or use --oci-binary runc",
                controller=name,
            )
        changed.append(f"mounted the {name} cgroup v1 hierarchy at {target}")
    note = "; ".join(changed) + " (crun refuses hybrid cgroup hosts otherwise)"
    log.warning("%s", note)
    return note


# --------------------------------------------------------------------------- error mapping


def _raise_for(verb: str, id: str, binary: str, done: _process.Completed) -> NoReturn:
    """The one place where crun/runc failures become magikrun errors."""
    text = done.stderr.decode(errors="replace").strip() or done.stdout.decode(errors="replace")
    name = os.path.basename(binary)
    lowered = text.lower()
    if "does not exist" in lowered or "container not found" in lowered:
        raise ContainerNotFound(
            f"{name} does not know container {id!r}: {text}",
            hint="its record is stale; remove it with 'magikrun delete --force ID'",
            id=id,
        )
    if "not running" in lowered or "cannot start" in lowered or "is paused" in lowered:
        raise InvalidState(
            f"{name} {verb} of container {id!r} refused: {text}",
            hint="check its status with 'magikrun state ID'",
            id=id,
            verb=verb,
        )
    error = CreateFailed if verb == "create" else BackendFailed
    raise error(
        f"{name} {verb} of container {id!r} failed (exit {done.returncode}): {text}",
        hint=f"the container's config.json or the host refused it; see {name}'s message",
        id=id,
        verb=verb,
    )


# ------------------------------------------------------------------------------- runtime


class NativeRuntime:
    """Linux containers run by crun (runc selectable), monitored by magikrun.

    ```python
    rt = NativeRuntime(Paths.resolve(root))
    await rt.create("web", "/path/to/bundle")
    await rt.start("web")
    code = await rt.wait("web")
    await rt.delete("web")
    ```

    **Parameters:**

    * `paths` - the magikrun root; state in ``paths.containers``, crun's in ``paths.oci_root``.
    * `oci_binary` - ``"crun"`` (default when it works here), ``"runc"`` or a path.
    * `store` - the shared `ContainerStore` (one is made from `paths` if not given).
    * `max_containers` - the container limit of a store made here.
    * `cgroup_root` - where the host's cgroup hierarchies are mounted.
    """

    name = "native"
    aliases: tuple[str, ...] = ("crun", "runc", "oci", "linux")
    features = frozenset({"native", "exec", "pid-file", "console-socket", "cgroupfs", "logs"})

    def __init__(
        self,
        paths: Paths,
        *,
        oci_binary: str | None = None,
        store: ContainerStore | None = None,
        max_containers: int = MAX_CONTAINERS,
        cgroup_root: Path = _CGROUP_ROOT,
    ) -> None:
        self.paths = paths
        self.cgroup_root = cgroup_root
        self.store = store or ContainerStore(paths, max_containers=max_containers)
        self._requested = oci_binary
        self._binary: str | None = None
        self.fallback_reason: str | None = None

    # -- handler-style description

    def can_handle(self, spec: Mapping[str, Any]) -> bool:
        """Any bundle with a root filesystem and a process; the default backend."""
        return isinstance(spec.get("root"), dict) and isinstance(spec.get("process"), dict)

    def unavailable_reason(self) -> str | None:
        if not os.path.exists("/proc/self/ns/pid"):
            return "this kernel has no namespaces (/proc/self/ns/pid is missing)"
        wanted = (self._requested,) if self._requested else OCI_BINARIES
        if not any(shutil.which(b) for b in wanted):
            return f"none of {', '.join(wanted)} is installed (Debian: apt-get install crun)"
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    async def binary(self) -> str:
        """The OCI runtime to drive, chosen (and the host fixed up) on first use."""
        if self._binary is not None:
            return self._binary
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailable(f"native containers cannot run here: {reason}")
        requested = self._requested
        if requested is not None and os.path.basename(requested) not in OCI_BINARIES:
            raise InvalidArgument(
                f"unknown OCI runtime {requested!r}",
                hint="use --oci-binary crun or --oci-binary runc",
                oci_binary=requested,
            )
        chosen = shutil.which(requested) if requested else None
        if requested is None:
            crun, runc = shutil.which("crun"), shutil.which("runc")
            chosen = crun or runc
            if crun is not None:
                try:
                    await ensure_cgroup_compat(self.cgroup_root)
                except RuntimeUnavailable as exc:
                    if runc is None:
                        raise
                    self.fallback_reason = f"{exc.message}; using runc instead"
                    log.warning("%s", self.fallback_reason)
                    chosen = runc
        elif os.path.basename(requested) == "crun":
            await ensure_cgroup_compat(self.cgroup_root)
        assert chosen is not None
        self._binary = chosen
        return chosen

    def _argv(self, binary: str, *args: str) -> list[str]:
        base = [binary, "--root", str(self.paths.oci_root)]
        if os.path.basename(binary) == "crun":
            base.append("--cgroup-manager=cgroupfs")
        return [*base, *args]

    async def _oci(
        self, binary: str, *args: str, timeout: float | None = None
    ) -> _process.Completed:
        return await _process.run(self._argv(binary, *args), timeout=timeout)

    def _binary_of(self, record: ContainerRecord) -> str:
        return str(record.extra["oci_binary"])

    # -- lifecycle

    async def create(
        self,
        id: str,
        bundle: str | os.PathLike[str],
        *,
        pid_file: str | os.PathLike[str] | None = None,
        console_socket: str | os.PathLike[str] | None = None,
        foreground: bool = False,
    ) -> ContainerState:
        """Create the container (status ``created``); its process waits for `start`.

        With ``foreground`` the container's stdin/stdout/stderr are this process's
        own (as ``magikrun run``) instead of the CRI log.
        """
        validate_container_id(id)
        bundle_path = Path(bundle).absolute()
        spec = load_bundle_config(bundle_path)
        binary = await self.binary()
        self.paths.oci_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = self.store.reserve(
            id,
            backend=self.name,
            bundle=bundle_path,
            annotations=spec.get("annotations", {}),
            extra={"oci_binary": binary},
        )
        directory = self.store.directory(id)
        try:
            argv = self._argv(
                binary, "create", "--bundle", str(bundle_path), "--pid-file", str(directory / "pid")
            )
            if console_socket is not None:
                argv += ["--console-socket", str(Path(console_socket).absolute())]
            argv.append(id)
            report = await _process.start_monitor(
                MonitorSpec(
                    argv=argv,
                    directory=str(directory),
                    pid_file=str(directory / "pid"),
                    log=not foreground,
                    inherit_stdin=foreground,
                ),
                timeout=CONTAINER_START_TIMEOUT,
            )
            if not report.ok:
                _raise_for(
                    "create",
                    id,
                    binary,
                    _process.Completed(
                        (binary,),
                        report.status or 1,
                        b"",
                        (report.stderr or report.reason).encode(),
                    ),
                )
            record = self.store.mark_created(record, report, pid_file)
        except BaseException as exc:
            await self._undo_create(id, binary, exc)
            raise
        return record.to_state()

    async def _undo_create(self, id: str, binary: str, exc: BaseException) -> None:
        """Remove whatever a failed create left, without hiding why it failed."""
        try:
            done = await self._oci(binary, "delete", "--force", id)
            stderr = done.stderr.decode(errors="replace")
            if done.returncode != 0 and "does not exist" not in stderr:
                exc.add_note(
                    f"cleanup: {os.path.basename(binary)} delete --force: {stderr.strip()}"
                )
            self.store.remove(id)
        except (OSError, MagikrunError) as cleanup:
            exc.add_note(f"cleanup of container {id!r} failed: {cleanup}")

    async def start(self, id: str) -> ContainerState:
        record = self.store.guard(id, "start")
        binary = self._binary_of(record)
        done = await self._oci(binary, "start", id, timeout=CONTAINER_START_TIMEOUT)
        if done.returncode != 0:
            _raise_for("start", id, binary, done)
        return self.store.update(record, status=ContainerStatus.RUNNING).to_state()

    async def state(self, id: str) -> ContainerState:
        return self.store.load(id).to_state()

    async def kill(self, id: str, signal: int | str, all: bool = False) -> None:
        number = parse_signal(signal)
        record = self.store.guard(id, "kill")
        binary = self._binary_of(record)
        done = await self._oci(binary, "kill", *(["--all"] if all else []), id, str(number))
        if done.returncode != 0:
            _raise_for("kill", id, binary, done)

    async def delete(self, id: str, force: bool = False) -> None:
        record = self.store.load(id) if force else self.store.guard(id, "delete")
        binary = self._binary_of(record) if "oci_binary" in record.extra else await self.binary()
        done = await self._oci(binary, "delete", *(["--force"] if force else []), id)
        if done.returncode != 0 and not (
            force and "does not exist" in done.stderr.decode(errors="replace")
        ):
            _raise_for("delete", id, binary, done)
        if record.monitor_alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_process.wait_exit(record.monitor_pid), _MONITOR_EXIT_WAIT)
        self.store.remove(id)

    async def wait(self, id: str) -> int:
        return await self.store.wait_exit(id)

    async def exec(
        self,
        id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the running container; its exit code and output."""
        if not argv:
            raise InvalidArgument("exec needs a command", hint="pass the program and its args")
        record = self.store.guard(id, "exec")
        binary = self._binary_of(record)
        options: list[str] = []
        for key, value in (env or {}).items():
            options += ["--env", f"{key}={value}"]
        if cwd is not None:
            options += ["--cwd", cwd]
        done = await self._oci(binary, "exec", *options, id, *argv, timeout=timeout or EXEC_TIMEOUT)
        return ExecResult(done.returncode, done.stdout, done.stderr)

    async def ps(self, id: str) -> list[int]:
        """Pids (host view) of the container's processes."""
        record = self.store.guard(id, "kill")
        binary = self._binary_of(record)
        done = await self._oci(binary, "ps", "--format", "json", id)
        if done.returncode != 0:
            _raise_for("ps", id, binary, done)
        return [int(p) for p in json.loads(done.stdout or b"[]")]
