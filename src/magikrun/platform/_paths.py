"""Where magikrun keeps things: every path derives from one root.

``--root DIR`` or ``MAGIKRUN_ROOT`` put everything (content, metadata, runtime
state, sockets) under DIR, so two roots share nothing. Without either, root
uses ``/var/lib/magikrun`` and ``/run/magikrun`` and other users ``~/.magikrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_ROOT", "Paths"]

ENV_ROOT = "MAGIKRUN_ROOT"


@dataclass(frozen=True, slots=True)
class Paths:
    """The directory layout of one magikrun root."""

    data: Path
    """Persistent content and metadata."""
    run: Path
    """Runtime state: live containers, sockets, mounts. Volatile (tmpfs on a default root)."""

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> Paths:
        """The layout for an explicit root, else ``$MAGIKRUN_ROOT``, else the defaults."""
        chosen = root if root is not None else os.environ.get(ENV_ROOT) or None
        if chosen is not None:
            base = Path(chosen).absolute()
            return cls(data=base, run=base / "run")
        if os.geteuid() == 0:
            return cls(data=Path("/var/lib/magikrun"), run=Path("/run/magikrun"))
        base = Path.home() / ".magikrun"
        return cls(data=base, run=base / "run")

    @property
    def blobs(self) -> Path:
        return self.data / "blobs"

    @property
    def ingest(self) -> Path:
        return self.data / "ingest"

    @property
    def snapshots(self) -> Path:
        return self.data / "snapshots"

    @property
    def cache(self) -> Path:
        return self.data / "cache"

    @property
    def metadata_db(self) -> Path:
        return self.data / "metadata.db"

    @property
    def containers(self) -> Path:
        return self.run / "containers"

    @property
    def bundles(self) -> Path:
        return self.run / "bundles"

    @property
    def oci_root(self) -> Path:
        """The ``--root`` handed to crun/runc."""
        return self.run / "oci"

    def ensure(self) -> Paths:
        """Create the top directories (mode 0700: they hold other users' secrets)."""
        for path in (self.data, self.run):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self
