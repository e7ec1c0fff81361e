"""Durable per-container state, shared by every backend.

Each container has a directory ``<paths.containers>/<id>/`` holding ``state.json``
(written temp-file-then-rename), the monitor's exit record and the CRI log. The
record is written before the container's resources exist and removed after they
are gone, so a new process finds every container an earlier one made, and
refreshes its status from the monitor's exit record and pid liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _process
from ..errors import (
    BackendFailed,
    ContainerExists,
    ContainerLimitReached,
    ContainerNotFound,
    InvalidContainerId,
    InvalidState,
)
from ..platform._limits import MAX_CONTAINER_ID_LEN, MAX_CONTAINERS
from ..platform._paths import Paths
from ._monitor import LOG_FILE, read_exit, rfc3339_nano
from ._types import ContainerState, ContainerStatus

__all__ = [
    "ContainerRecord",
    "ContainerStore",
    "process_start_time",
    "read_pid_file",
    "stop_pid_file",
    "validate_container_id",
    "write_pid_file",
]

_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_STATE_FILE = "state.json"
_LOCK_FILE = ".lock"
_STOP_WAIT = 10.0
"""Seconds between TERM and KILL when stopping a process named by a pid file."""
_STOP_POLL = 0.02

_VERB_HINTS = {
    "start": "only a created container can be started; create it again to run it once more",
    "kill": "the container is not running; remove it with 'magikrun delete ID'",
    "delete": "stop it first ('magikrun kill ID KILL') or pass --force",
    "exec": "exec needs a running container; start it first",
}


def validate_container_id(id: str) -> str:
    """``id`` if it is 1-MAX_CONTAINER_ID_LEN chars of ``[A-Za-z0-9_.-]`` not starting with '.'."""
    if (
        not isinstance(id, str)
        or not 0 < len(id.encode()) <= MAX_CONTAINER_ID_LEN
        or not _ID_RE.fullmatch(id)
        or id.startswith(".")
    ):
        raise InvalidContainerId(f"invalid container id {id!r}", id=id)
    return id


def process_start_time(pid: int) -> int | None:
    """The kernel's start time (clock ticks since boot) of ``pid``; ``None`` if it is gone.

    Stored next to every pid we record so that a recycled pid is never mistaken
    for our process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and process_start_time(pid) == start


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """What magikrun remembers about one container."""

    id: str
    backend: str
    bundle: str
    status: ContainerStatus
    created: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None
    pid_start: int | None = None
    monitor_pid: int | None = None
    monitor_start: int | None = None
    exit_code: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Backend-specific facts (e.g. which OCI binary created it)."""

    def to_state(self) -> ContainerState:
        return ContainerState(
            id=self.id,
            status=self.status,
            bundle=Path(self.bundle),
            pid=self.pid,
            annotations=dict(self.annotations),
            created=self.created,
            exit_code=self.exit_code,
        )

    def monitor_alive(self) -> bool:
        return _alive(self.monitor_pid, self.monitor_start)

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ContainerRecord:
        data = json.loads(raw)
        data["status"] = ContainerStatus(data["status"])
        return cls(**data)


class ContainerStore:
    """The container records of one magikrun root.

    **Parameters:**

    * `paths` - the root's layout; records live under ``paths.containers``.
    * `max_containers` - how many containers may exist at once (``MAX_CONTAINERS``).
    """

    def __init__(self, paths: Paths, *, max_containers: int = MAX_CONTAINERS) -> None:
        self.paths = paths
        self.root = paths.containers
        self.max_containers = max_containers

    def directory(self, id: str) -> Path:
        return self.root / validate_container_id(id)

    def log_path(self, id: str) -> Path:
        """The container's CRI-format log."""
        return self.directory(id) / LOG_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def reserve(
        self,
        id: str,
        *,
        backend: str,
        bundle: str | os.PathLike[str],
        annotations: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ContainerRecord:
        """Claim ``id`` with a record in status ``creating``, before anything else exists.

        Raises `InvalidContainerId`, `ContainerLimitReached` or `ContainerExists`
        without touching anything.
        """
        validate_container_id(id)
        with self._locked():
            count = sum(1 for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False))
            if count >= self.max_containers:
                raise ContainerLimitReached(
                    f"cannot create container {id!r}: {count} containers exist, "
                    f"the limit is {self.max_containers}",
                    id=id,
                    limit=self.max_containers,
                )
            try:
                (self.root / id).mkdir(mode=0o700)
            except FileExistsError:
                raise ContainerExists(f"container {id!r} already exists", id=id) from None
            record = ContainerRecord(
                id=id,
                backend=backend,
                bundle=str(Path(bundle).absolute()),
                status=ContainerStatus.CREATING,
                created=rfc3339_nano(),
                annotations=dict(annotations or {}),
                extra=dict(extra or {}),
            )
            self.save(record)
        return record

    def save(self, record: ContainerRecord) -> None:
        directory = self.directory(record.id)
        tmp = directory / f"{_STATE_FILE}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, record.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, directory / _STATE_FILE)

    def update(self, record: ContainerRecord, **changes: Any) -> ContainerRecord:
        """Save ``record`` with ``changes`` applied and return the new record."""
        new = dataclasses.replace(record, **changes)
        self.save(new)
        return new

    def load(self, id: str) -> ContainerRecord:
        """The container's record, its status refreshed; `ContainerNotFound` if unknown."""
        directory = self.directory(id)
        try:
            raw = (directory / _STATE_FILE).read_bytes()
        except FileNotFoundError:
            raise ContainerNotFound(f"container {id!r} does not exist", id=id) from None
        return self.refresh(ContainerRecord.from_json(raw))

    def refresh(self, record: ContainerRecord) -> ContainerRecord:
        """Bring the status up to date: the monitor's exit record, else pid liveness."""
        if record.status not in (ContainerStatus.CREATED, ContainerStatus.RUNNING):
            return record
        exited = read_exit(str(self.directory(record.id)))
        if exited is not None:
            return self._stopped(record, int(exited["exitCode"]))
        if not record.monitor_alive() and not _alive(record.pid, record.pid_start):
            # The monitor may have written its record between the two reads.
            exited = read_exit(str(self.directory(record.id)))
            return self._stopped(record, None if exited is None else int(exited["exitCode"]))
        return record

    def _stopped(self, record: ContainerRecord, exit_code: int | None) -> ContainerRecord:
        """Save the record as stopped; `ContainerNotFound` if another process removed the
        container meanwhile (its directory is gone, so there is nothing to save into)."""
        try:
            return self.update(record, status=ContainerStatus.STOPPED, exit_code=exit_code)
        except FileNotFoundError:
            raise ContainerNotFound(
                f"container {record.id!r} was removed while its status was read", id=record.id
            ) from None

    def guard(self, id: str, verb: str) -> ContainerRecord:
        """The refreshed record if ``verb`` is allowed now, else `InvalidState`."""
        record = self.load(id)
        status = record.status
        allowed = {
            "start": status.can_start,
            "kill": status.can_kill,
            "delete": status.can_delete,
            "exec": status.can_exec,
        }[verb]
        if not allowed:
            raise InvalidState(
                f"cannot {verb} container {id!r}: it is {status.value}",
                hint=_VERB_HINTS[verb],
                id=id,
                status=status.value,
                verb=verb,
            )
        return record

    def list(self) -> list[ContainerRecord]:
        """Every container of this root, refreshed, sorted by id."""
        if not self.root.is_dir():
            return []
        records = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(ContainerNotFound):
                    records.append(self.load(entry.name))
        return records

    def mark_created(
        self,
        record: ContainerRecord,
        report: _process.MonitorReport,
        pid_file: str | os.PathLike[str] | None,
    ) -> ContainerRecord:
        """Record what a monitor reported after a successful create: CREATED, with the
        process's and the monitor's pids and start times (against pid reuse); then write
        the caller's ``--pid-file``."""
        assert report.ok and report.pid is not None
        record = self.update(
            record,
            status=ContainerStatus.CREATED,
            pid=report.pid,
            pid_start=process_start_time(report.pid),
            monitor_pid=report.monitor_pid,
            monitor_start=process_start_time(report.monitor_pid),
        )
        if pid_file is not None:
            write_pid_file(Path(pid_file), report.pid)
        return record

    async def wait_exit(
        self,
        id: str,
        *,
        keeper: str = "its monitor",
        hint: str = "the monitor was killed; delete the container with --force",
    ) -> int:
        """Block until the container's monitor (``keeper``, as errors name it) ends; the
        exit code it recorded. Every backend's ``wait``: the monitor outlives the process."""
        record = self.load(id)
        if record.status in (ContainerStatus.CREATED, ContainerStatus.RUNNING):
            if record.monitor_alive():
                await _process.wait_exit(record.monitor_pid)
            record = self.load(id)
        if record.exit_code is None:
            raise BackendFailed(
                f"the exit code of container {id!r} was lost ({keeper} ended without one)",
                hint=hint,
                id=id,
            )
        return record.exit_code

    def remove(self, id: str) -> None:
        """Forget the container: its directory and everything in it."""
        shutil.rmtree(self.directory(id), ignore_errors=False)


def write_pid_file(path: Path, pid: int) -> None:
    """Write ``--pid-file`` the way runc does: whole or not at all (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(pid))
    tmp.rename(path)


def read_pid_file(path: Path) -> tuple[int, int | None] | None:
    """``(pid, start time)`` from a ``PID START`` file, or None if absent."""
    try:
        pid_text, _, start_text = path.read_text().partition(" ")
    except FileNotFoundError:
        return None
    return int(pid_text), int(start_text) if start_text.strip() else None


async def stop_pid_file(path: Path) -> None:
    """TERM the process a pid file names (if it is still that process, by start time),
    KILL it after ``_STOP_WAIT``, then remove the file."""
    found = read_pid_file(path)
    if found is None:
        return
    pid, start = found
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process_start_time(pid) != start:
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOP_WAIT
        while process_start_time(pid) == start and loop.time() < deadline:
            await asyncio.sleep(_STOP_POLL)
    path.unlink(missing_ok=True)
