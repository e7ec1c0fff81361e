"""The embedded demo images: deterministic, importable, and what they claim to be."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import wasmtime

from magikrun.image import (
    BUSYBOX_DEMO_REF,
    HELLO_WASM_DEMO_REF,
    ImageService,
    build_demo_images,
    open_wasm_module,
    write_demo_layout,
)
from magikrun.image._mediatypes import WASM_CONFIG, WASM_LAYER
from magikrun.platform import Paths


def test_layout_is_deterministic(short_tmp: Path) -> None:
    first = write_demo_layout(short_tmp / "a")
    second = write_demo_layout(short_tmp / "b")
    assert first == second
    assert (short_tmp / "a" / "index.json").read_bytes() == (
        short_tmp / "b" / "index.json"
    ).read_bytes()


async def test_build_and_import_twice_gives_same_digests(paths: Paths, short_tmp: Path) -> None:
    first = await build_demo_images(paths)
    again = await build_demo_images(paths)
    other = await build_demo_images(Paths.resolve(short_tmp / "other").ensure())
    digests = [i.manifest_digest for i in first]
    assert digests == [i.manifest_digest for i in again] == [i.manifest_digest for i in other]
    assert [i.reference for i in first] == [BUSYBOX_DEMO_REF, HELLO_WASM_DEMO_REF]
    assert [s.reference for s in ImageService(paths).list()] == [
        BUSYBOX_DEMO_REF,
        HELLO_WASM_DEMO_REF,
    ]


async def test_busybox_image_content(paths: Paths) -> None:
    busybox, _ = await build_demo_images(paths)
    assert busybox.kind == "oci"
    assert busybox.config.cmd == ("sh",)
    assert any(e.startswith("PATH=") for e in busybox.config.env)
    snapshot = ImageService(paths).snapshots.path(busybox.layers[0].diff_id)
    assert (snapshot / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(snapshot / "bin" / "sh") == "busybox"
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout
    for applet in ("ls", "cat", "echo", "wget"):
        if applet in applets.split():
            assert os.readlink(snapshot / "bin" / applet) == "busybox"
    assert (snapshot / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert (snapshot / "etc" / "group").is_file()
    assert (snapshot / "tmp").stat().st_mode & 0o1777 == 0o1777


async def test_wasm_image_is_an_artifact_that_runs(paths: Paths, short_tmp: Path) -> None:
    _, hello = await build_demo_images(paths)
    service = ImageService(paths)
    assert hello.kind == "wasm"
    (layer,) = hello.layers
    assert layer.media_type == WASM_LAYER
    assert service.inspect(HELLO_WASM_DEMO_REF)["manifest"]["config"]["mediaType"] == WASM_CONFIG
    with service.open_blob(layer.digest) as f:
        module_bytes = f.read()
    with open_wasm_module(hello, service.open_blob) as f:
        assert f.read() == module_bytes
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    out = short_tmp / "stdout"
    wasi.stdout_file = str(out)
    store.set_wasi(wasi)
    instance = linker.instantiate(store, wasmtime.Module(engine, module_bytes))
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    start(store)
    assert out.read_text() == "Hello from magikrun on WebAssembly!\n"
