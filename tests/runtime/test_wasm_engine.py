"""The wasm engine on its own: limits, exit codes, WASI plumbing and the module cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import wasmtime

from magikrun.errors import DigestMismatch, InvalidArgument, InvalidBundle, LimitExceeded
from magikrun.runtime._wasm_engine import (
    EXIT_MEMORY_LIMIT,
    EXIT_OUT_OF_FUEL,
    EXIT_TRAP,
    Preopen,
    WasiSpec,
    WasmEngine,
    WasmLimits,
    WasmResult,
    WasmStop,
)

WAT_DIR = Path(__file__).parent / "wasm"


def wasm(name: str) -> bytes:
    return bytes(wasmtime.wat2wasm((WAT_DIR / f"{name}.wat").read_text()))


def run(engine: WasmEngine, name: str, spec: WasiSpec) -> WasmResult:
    return engine.run(engine.prepare(engine.load_bytes(wasm(name), name=name), spec))


@pytest.fixture
def out(short_tmp: Path) -> Path:
    return short_tmp / "stdout"


def test_hello_writes_stdout_and_exits_zero(short_tmp: Path, out: Path) -> None:
    result = run(WasmEngine(cache_dir=None), "hello", WasiSpec(argv=("hello",), stdout=str(out)))
    assert result == WasmResult(0, WasmStop.EXITED)
    assert out.read_text() == "hello from wasm\n"


@pytest.mark.parametrize(("code", "status"), [(0, 0), (1, 1), (42, 42), (200, 200), (263, 7)])
def test_proc_exit_gives_its_code_as_exit_does(code: int, status: int) -> None:
    result = run(WasmEngine(cache_dir=None), "exit_code", WasiSpec(argv=("exit", str(code))))
    assert result == WasmResult(status, WasmStop.EXITED)


def test_argv_and_env_reach_the_module(out: Path) -> None:
    spec = WasiSpec(
        argv=("echo", "two words", "x=y"),
        env=(("GREETING", "hi there"), ("EMPTY", "")),
        stdout=str(out),
    )
    assert run(WasmEngine(cache_dir=None), "echo", spec).exit_code == 0
    assert out.read_text().splitlines() == [
        "two words",
        "x=y",
        "GREETING=hi there",
        "EMPTY=",
    ]


def test_out_of_fuel_stops_with_its_own_code_and_reason() -> None:
    engine = WasmEngine(cache_dir=None, limits=WasmLimits(fuel=100_000))
    result = run(engine, "loop", WasiSpec(argv=("loop",)))
    assert (result.exit_code, result.stop) == (EXIT_OUT_OF_FUEL, WasmStop.OUT_OF_FUEL)
    assert "ran out of fuel (100000 units)" in result.message


def test_memory_limit_stops_with_its_own_code_and_reason() -> None:
    engine = WasmEngine(cache_dir=None, limits=WasmLimits(memory_pages=16))
    result = run(engine, "memory_hog", WasiSpec(argv=("hog",)))
    assert (result.exit_code, result.stop) == (EXIT_MEMORY_LIMIT, WasmStop.MEMORY_LIMIT)
    assert "limit of 16 pages" in result.message


def test_trap_is_134_with_the_trap_message() -> None:
    result = run(WasmEngine(cache_dir=None), "trap", WasiSpec(argv=("trap",)))
    assert (result.exit_code, result.stop) == (EXIT_TRAP, WasmStop.TRAPPED)
    assert "unreachable" in result.message
    # A trap with memory to spare is not reported as a memory-limit stop.
    assert "memory" not in result.message


def test_interrupt_stops_running_code_with_128_plus_signal() -> None:
    engine = WasmEngine(cache_dir=None)
    prepared = engine.prepare(engine.load_bytes(wasm("loop"), name="loop"), WasiSpec(argv=("l",)))
    engine.interrupt(15)
    result = engine.run(prepared)
    assert (result.exit_code, result.stop) == (143, WasmStop.INTERRUPTED)
    assert "SIGTERM" in result.message


def test_preopened_directory_is_readable_and_writable(short_tmp: Path, out: Path) -> None:
    data = short_tmp / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    spec = WasiSpec(argv=("files",), preopens=(Preopen(str(data), "/data"),), stdout=str(out))
    assert run(WasmEngine(cache_dir=None), "files", spec).exit_code == 0
    assert (data / "out.txt").read_text() == "written by wasm\n"
    assert out.read_text() == "from the host\n"


def test_readonly_preopen_refuses_writes(short_tmp: Path) -> None:
    data = short_tmp / "data"
    data.mkdir()
    spec = WasiSpec(argv=("files",), preopens=(Preopen(str(data), "/data", readonly=True),))
    # Step 1 (opening out.txt for writing) fails: exit 10 + 1.
    assert run(WasmEngine(cache_dir=None), "files", spec).exit_code == 11
    assert list(data.iterdir()) == []


def test_second_engine_loads_from_cache_without_compiling(short_tmp: Path) -> None:
    cache = short_tmp / "cache"
    first = WasmEngine(cache_dir=cache)
    compiled = first.load_bytes(wasm("hello"), name="hello")
    assert (compiled.cache_hit, first.compiles) == (False, 1)
    cached = first.cache_file(compiled.digest)
    assert cached is not None and cached.is_file()
    assert [p.name for p in cache.iterdir()] == [cached.name]

    second = WasmEngine(cache_dir=cache)
    again = second.load_bytes(wasm("hello"), name="hello")
    assert (again.cache_hit, second.compiles, again.digest) == (True, 0, compiled.digest)
    assert second.run(second.prepare(again, WasiSpec(argv=("h",)))).exit_code == 0


def test_corrupt_cache_entry_is_compiled_again(short_tmp: Path) -> None:
    cache = short_tmp / "cache"
    engine = WasmEngine(cache_dir=cache)
    compiled = engine.load_bytes(wasm("hello"), name="hello")
    cached = engine.cache_file(compiled.digest)
    assert cached is not None
    cached.write_bytes(b"not a compiled module")
    fresh = WasmEngine(cache_dir=cache)
    again = fresh.load_bytes(wasm("hello"), name="hello")
    assert (again.cache_hit, fresh.compiles) == (False, 1)
    assert cached.read_bytes() != b"not a compiled module"


def test_module_over_size_limit_is_refused_before_reading(short_tmp: Path) -> None:
    path = short_tmp / "big.wasm"
    path.write_bytes(wasm("hello"))
    engine = WasmEngine(cache_dir=short_tmp / "cache", limits=WasmLimits(module_size=16))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(LimitExceeded, match="over the limit of 16"):
            engine.load_fd(fd, name="big.wasm")
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # not a byte was read
    finally:
        os.close(fd)
    assert not (short_tmp / "cache").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"(module)", "not a WebAssembly binary"),
        (b"\0asm\x01\0\0\0\x99garbage", "is invalid"),
        (wasmtime.wat2wasm('(module (func (export "main")))'), "exports no _start"),
        (
            wasmtime.wat2wasm('(module (import "env" "f" (func)) (func (export "_start")))'),
            "imports env.f",
        ),
        (
            wasmtime.wat2wasm(
                '(module (import "wasi_snapshot_preview1" "no_such_call" (func))'
                ' (func (export "_start")))'
            ),
            "cannot be linked",
        ),
    ],
)
def test_bad_modules_are_refused_at_load(short_tmp: Path, source: bytes, message: str) -> None:
    engine = WasmEngine(cache_dir=short_tmp / "cache")
    with pytest.raises(InvalidBundle, match=message) as info:
        engine.prepare(engine.load_bytes(bytes(source), name="bad.wasm"), WasiSpec(argv=("b",)))
    assert info.value.hint
    assert not list((short_tmp / "cache").glob(".tmp-*"))


def test_initial_memory_over_limit_is_refused_at_load() -> None:
    engine = WasmEngine(cache_dir=None, limits=WasmLimits(memory_pages=4))
    module = wasmtime.wat2wasm('(module (memory (export "memory") 5) (func (export "_start")))')
    with pytest.raises(LimitExceeded, match="needs 5 memory pages"):
        engine.load_bytes(bytes(module), name="big-memory.wasm")


@pytest.mark.parametrize(
    "limits",
    [{"fuel": 0}, {"memory_pages": -1}, {"memory_pages": 65_537}, {"module_size": True}],
)
def test_limits_are_validated(limits: dict[str, int]) -> None:
    with pytest.raises(InvalidArgument):
        WasmLimits(**limits)


def test_component_is_refused_with_a_clear_reason() -> None:
    component = b"\0asm\x0d\x00\x01\x00" + b"\0" * 8
    with pytest.raises(InvalidBundle, match="WASI preview 2") as info:
        WasmEngine(cache_dir=None).load_bytes(component, name="component.wasm")
    assert "wasm32-wasip1" in info.value.hint


def test_expected_digest_is_checked_before_compiling(short_tmp: Path) -> None:
    engine = WasmEngine(cache_dir=short_tmp / "cache")
    with pytest.raises(DigestMismatch, match="not sha256:0000"):
        engine.load_bytes(wasm("hello"), name="hello", expected_digest="sha256:" + "0" * 64)
    assert (engine.compiles, (short_tmp / "cache").exists()) == (0, False)
    good = engine.load_bytes(wasm("hello"), name="hello")
    assert engine.load_bytes(wasm("hello"), name="hello", expected_digest=good.digest).cache_hit
