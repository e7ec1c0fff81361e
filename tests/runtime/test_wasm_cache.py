"""The compiled-module cache is swept by age of last use, never beyond its own files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import wasmtime

from magikrun.runtime._wasm_cache import sweep_module_cache
from magikrun.runtime._wasm_engine import WasmEngine

HELLO = Path(__file__).parent / "wasm" / "hello.wat"
DAY = 86400.0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_removes_unused_modules_and_stale_temp_files(short_tmp: Path) -> None:
    cache = short_tmp / "wasm"
    wasm = bytes(wasmtime.wat2wasm(HELLO.read_text()))
    engine = WasmEngine(cache_dir=cache)
    compiled = engine.load_bytes(wasm, name="hello.wasm")
    used = engine.cache_file(compiled.digest)
    assert used is not None and used.is_file()
    unused = cache / f"{'0' * 64}-oldengine.cwasm"
    unused.write_bytes(b"compiled by another wasmtime")
    stale_temp = cache / ".tmp-abc.cwasm"
    stale_temp.write_bytes(b"")
    fresh_temp = cache / ".tmp-def.cwasm"
    fresh_temp.write_bytes(b"")
    foreign = cache / "notes.txt"
    foreign.write_text("not the cache's")
    for path in (used, unused, foreign):
        _age(path, 40 * DAY)
    _age(stale_temp, 2 * 3600)

    # A cache hit counts as use: the module loaded now is kept.
    assert WasmEngine(cache_dir=cache).load_bytes(wasm, name="hello.wasm").cache_hit
    removed = sweep_module_cache(cache)
    assert sorted(removed) == sorted([unused, stale_temp])
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [used.name, fresh_temp.name, foreign.name]
    )

    # Unused past the age, it goes too (and the temp file, stale by then);
    # a missing directory is nothing to sweep.
    later = sweep_module_cache(cache, now=time.time() + 31 * DAY)
    assert sorted(later) == sorted([used, fresh_temp])
    assert [p.name for p in cache.iterdir()] == [foreign.name]
    assert sweep_module_cache(short_tmp / "absent") == []
