"""Durable pod state: pod records and resource intents in the root's metadata database.

A resource is recorded (an *intent*: kind, key, data) before it is created and marked
done after, so a crash at any point leaves enough to undo it. A pod whose record is
still ``creating`` is leased by its owner process (pid and start time): while the
owner lives nobody else touches it; once it is gone, recovery replays the undo steps
of the recorded intents in reverse.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from ..errors import InvalidArgument, InvalidPodSpec, PodExists, PodNotFound
from ..platform._paths import Paths
from ..runtime._store import process_start_time
from ..storage import MetadataStore
from ._spec import PodSpec, pod_id
from ._types import ContainerInfo, PodPhase, PodStatus, RuntimeName

__all__ = ["PodRecord", "PodStore", "Resource"]

RecordState = Literal["creating", "ready", "stopped", "failed"]
"""``creating``: run_pod is at work (the owner holds the lease); ``ready``: every app
container was started; ``stopped``: stop_pod ran; ``failed``: a rollback could not
finish, so recovery must retry it."""

_MIGRATIONS = [
    """
    CREATE TABLE pods (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        namespace TEXT NOT NULL,
        runtime TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        created TEXT NOT NULL,
        ip TEXT,
        owner_pid INTEGER,
        owner_start INTEGER,
        info TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE pod_resources (
        pod_id TEXT NOT NULL REFERENCES pods(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        data TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (pod_id, seq)
    );
    """,
]


@dataclass(frozen=True, slots=True)
class Resource:
    """One thing a pod made (or was about to make): how to find and undo it."""

    pod_id: str
    seq: int
    kind: str
    key: str
    data: dict[str, Any]
    done: bool


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the database knows of one pod."""

    id: str
    name: str
    namespace: str
    runtime: str
    state: RecordState
    spec_yaml: str
    created: datetime
    ip: str | None
    owner_pid: int | None
    owner_start: int | None
    info: dict[str, Any]

    @property
    def spec(self) -> PodSpec:
        return PodSpec.from_yaml(self.spec_yaml.encode(), allow_privileged=True)

    def owner_alive(self) -> bool:
        """Whether the process that holds the creating lease still runs."""
        if self.owner_pid is None:
            return False
        return process_start_time(self.owner_pid) == self.owner_start

    def status(
        self, phase: PodPhase, containers: tuple[ContainerInfo, ...], message: str | None
    ) -> PodStatus:
        """This pod's status, as a runtime read ``phase``, ``containers`` and ``message``."""
        return PodStatus(
            id=self.id,
            name=self.name,
            namespace=self.namespace,
            runtime=cast(RuntimeName, self.runtime),
            phase=phase,
            ip=self.ip,
            containers=containers,
            created_at=self.created,
            message=message,
        )


def _owner() -> tuple[int, int | None]:
    pid = os.getpid()
    return pid, process_start_time(pid)


class PodStore:
    """The pod tables of one root (``pods``, ``pod_resources``)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.meta = MetadataStore(paths)
        self.meta.migrate("pods", _MIGRATIONS)

    def create(self, spec: PodSpec, runtime: str) -> PodRecord:
        """Insert the pod as ``creating``, owned by this process; `PodExists` if taken."""
        owner_pid, owner_start = _owner()
        created = datetime.now(UTC)
        try:
            with self.meta.transaction() as conn:
                conn.execute(
                    "INSERT INTO pods(id, name, namespace, runtime, state, spec, created, "
                    "owner_pid, owner_start) VALUES (?, ?, ?, ?, 'creating', ?, ?, ?, ?)",
                    (
                        spec.id,
                        spec.name,
                        spec.namespace,
                        runtime,
                        spec.to_yaml().decode(),
                        created.isoformat(),
                        owner_pid,
                        owner_start,
                    ),
                )
        except sqlite3.IntegrityError:
            raise PodExists(
                f"pod {spec.namespace}/{spec.name} exists",
                pod_id=spec.id,
            ) from None
        return self.get(spec.id)

    def get(self, id: str) -> PodRecord:
        with self.meta.transaction() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise PodNotFound(f"pod {id!r} does not exist", pod_id=id)
        return _record(row)

    def list(self) -> list[PodRecord]:
        with self.meta.transaction() as conn:
            rows = conn.execute(f"{_SELECT} ORDER BY namespace, name").fetchall()
        return [_record(row) for row in rows]

    def update(self, id: str, **changes: Any) -> None:
        """Set ``state``, ``ip`` or ``info`` (merged) of a pod."""
        with self.meta.transaction() as conn:
            if "info" in changes:
                row = conn.execute("SELECT info FROM pods WHERE id = ?", (id,)).fetchone()
                info = {**json.loads(row[0]), **changes.pop("info")} if row else {}
                conn.execute("UPDATE pods SET info = ? WHERE id = ?", (json.dumps(info), id))
            if "state" in changes:
                conn.execute("UPDATE pods SET state = ? WHERE id = ?", (changes.pop("state"), id))
            if "ip" in changes:
                conn.execute("UPDATE pods SET ip = ? WHERE id = ?", (changes.pop("ip"), id))
        if changes:
            raise InvalidArgument(f"cannot update pod fields {sorted(changes)}", pod_id=id)

    def claim(self, record: PodRecord, state: RecordState) -> bool:
        """Take over a pod whose owner is gone (or that is ours): True if we got it."""
        owner_pid, owner_start = _owner()
        with self.meta.transaction() as conn:
            cursor = conn.execute(
                "UPDATE pods SET owner_pid = ?, owner_start = ?, state = ? WHERE id = ? "
                "AND owner_pid IS ? AND owner_start IS ?",
                (owner_pid, owner_start, state, record.id, record.owner_pid, record.owner_start),
            )
        return cursor.rowcount == 1

    def remove(self, id: str) -> None:
        with self.meta.transaction() as conn:
            conn.execute("DELETE FROM pods WHERE id = ?", (id,))

    # -- resources -------------------------------------------------------------

    def intent(self, pod_id: str, kind: str, key: str, data: dict[str, Any]) -> Resource:
        """Record that ``kind``/``key`` is about to be created (before creating it)."""
        with self.meta.transaction() as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM pod_resources WHERE pod_id = ?", (pod_id,)
            ).fetchone()
            seq = int(row[0])
            conn.execute(
                "INSERT INTO pod_resources(pod_id, seq, kind, key, data) VALUES (?, ?, ?, ?, ?)",
                (pod_id, seq, kind, key, json.dumps(data)),
            )
        return Resource(pod_id, seq, kind, key, data, False)

    def done(self, resource: Resource) -> None:
        with self.meta.transaction() as conn:
            conn.execute(
                "UPDATE pod_resources SET done = 1 WHERE pod_id = ? AND seq = ?",
                (resource.pod_id, resource.seq),
            )

    def forget(self, resource: Resource) -> None:
        """The resource was undone: drop its row."""
        with self.meta.transaction() as conn:
            conn.execute(
                "DELETE FROM pod_resources WHERE pod_id = ? AND seq = ?",
                (resource.pod_id, resource.seq),
            )

    def resources(self, pod_id: str) -> builtins.list[Resource]:
        """The pod's resources in creation order."""
        with self.meta.transaction() as conn:
            rows = conn.execute(
                "SELECT pod_id, seq, kind, key, data, done FROM pod_resources "
                "WHERE pod_id = ? ORDER BY seq",
                (pod_id,),
            ).fetchall()
        return [Resource(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5])) for r in rows]

    def find(self, name_or_id: str, namespace: str = "default") -> str:
        """The id of the pod named ``name_or_id`` in ``namespace``, or with that id."""
        with self.meta.transaction() as conn:
            row = conn.execute("SELECT id FROM pods WHERE id = ?", (name_or_id,)).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT id FROM pods WHERE name = ? AND namespace = ?",
                    (name_or_id, namespace),
                ).fetchone()
        if row is None:
            try:
                wanted = pod_id(namespace, name_or_id)
            except InvalidPodSpec:
                wanted = name_or_id
            raise PodNotFound(f"no pod {name_or_id!r} in namespace {namespace!r}", pod_id=wanted)
        return str(row[0])


_SELECT = (
    "SELECT id, name, namespace, runtime, state, spec, created, ip, owner_pid, owner_start, "
    "info FROM pods"
)


def _record(row: tuple[Any, ...]) -> PodRecord:
    return PodRecord(
        id=row[0],
        name=row[1],
        namespace=row[2],
        runtime=row[3],
        state=row[4],
        spec_yaml=row[5],
        created=datetime.fromisoformat(row[6]),
        ip=row[7],
        owner_pid=row[8],
        owner_start=row[9],
        info=json.loads(row[10]),
    )
