"""Garbage collection of the compiled-module cache (``paths.cache / "wasm"``).

A cached module is removed when it has not been used for ``WASM_CACHE_MAX_AGE``
(every cache hit refreshes its mtime), not by which images reference it: modules
also come from bundles no image describes (the OCI CLI), and a module kept for a
month of disuse is cheap to compile again. Files made for another wasmtime version
or other engine settings are never hit, so they age out the same way. Temporary
files of an interrupted write are removed after an hour. Stdlib only, so that a
collector does not import wasmtime.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

from ..platform._limits import WASM_CACHE_MAX_AGE

__all__ = ["CACHE_SUFFIX", "TEMP_PREFIX", "sweep_module_cache"]

CACHE_SUFFIX = ".cwasm"
TEMP_PREFIX = ".tmp-"
_TEMP_MAX_AGE = 3600.0


def sweep_module_cache(
    cache_dir: Path, *, max_age: float = WASM_CACHE_MAX_AGE, now: float | None = None
) -> list[Path]:
    """Remove compiled modules unused for ``max_age`` seconds and stale temp files.

    Returns what was removed. Only regular files with the cache's own names are
    touched; anything else in the directory is left alone.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        dir_fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return removed
    try:
        for name in os.listdir(dir_fd):
            if not name.endswith(CACHE_SUFFIX):
                continue
            limit = _TEMP_MAX_AGE if name.startswith(TEMP_PREFIX) else max_age
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and now - info.st_mtime > limit:
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(cache_dir / name)
    finally:
        os.close(dir_fd)
    return removed
