"""Infra extensions in microVM pods: the host's infra program run unchanged in the guest,
vminit its event source, port requests answered by the keeper; and vminit's event JSON
and bounded event buffer, without a VM."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from magikrun.errors import InfraExtensionFailed, PodStartFailed
from magikrun.image import build_demo_images
from magikrun.infra import INFRA_PATH_ENV
from magikrun.infra._events import event_from_json, event_to_json
from magikrun.platform import Paths
from magikrun.pod import PodSpec
from magikrun.pod._base import pod_dir
from magikrun.pod._microvm import MicroVmPodRuntime
from magikrun.vminit._infra import InfraRelay, event
from magikrun.vminit._init import LogBuffer, Loop, Process
from tests.infra._kit import free_port, get_json, infra_pod, wait_for
from tests.infra.extpkg.dist import install

from ..pod._podkit import BUSYBOX
from .conftest import needs_vm
from .test_microvm_pod import _leftovers

GUEST_IP = "10.0.2.15"


@pytest.fixture
def ext_path(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = install(short_tmp / "ext")
    monkeypatch.setenv(INFRA_PATH_ENV, str(path))
    return path


def _with_init(manifest: bytes, name: str, command: str) -> PodSpec:
    """``manifest`` with one busybox init container and an emptyDir at /data for all."""
    text = manifest.decode()
    mount = "    volumeMounts: [{name: data, mountPath: /data}]\n"
    init = (
        f"  initContainers:\n  - name: {name}\n    image: {BUSYBOX}\n"
        f"    imagePullPolicy: Never\n    command: [sh, -c, {json.dumps(command)}]\n{mount}"
    )
    head, _, containers = text.partition("  containers:\n")
    entries = containers.replace("    command:", f"{mount}    command:")
    volumes = "  volumes: [{name: data, emptyDir: {}}]\n"
    return PodSpec.from_yaml(f"{head}{volumes}{init}  containers:\n{entries}".encode())


@pytest.mark.slow
@needs_vm
async def test_health_extension_in_a_microvm_pod(paths: Paths) -> None:
    await build_demo_images(paths)
    port = free_port()
    manifest = infra_pod(
        "vmhealth",
        "health",
        {"app": "sleep 1000", "job": "while [ ! -f /data/go ]; do sleep 0.2; done; exit 3"},
        config={"health": json.dumps({"port": 8080, "hostPort": port})},
    )
    spec = _with_init(manifest, "prep", "echo prepared")
    runtime = MicroVmPodRuntime(paths)
    handle = await runtime.run_pod(spec)
    try:
        document = await wait_for(
            lambda: get_json("127.0.0.1", port),
            lambda d: (
                {c["name"]: c["state"] for c in d["containers"]}
                == {"prep": "exited", "app": "running", "job": "running"}
            ),
        )
        assert handle.ip is not None and handle.ip.startswith("10.89.")  # on the bridge
        assert document["pod"] == {"name": "vmhealth", "namespace": "default", "ip": handle.ip}
        prep = next(c for c in document["containers"] if c["name"] == "prep")
        assert (prep["exitCode"], prep["reason"]) == (0, "Completed")
        touched = await runtime.exec(handle.id, "app", ["touch", "/data/go"])
        assert touched.exit_code == 0
        containers = await wait_for(
            lambda: get_json("127.0.0.1", port, "/containers"),
            lambda cs: any(c["name"] == "job" and c["state"] == "exited" for c in cs),
        )
        states = {c["name"]: (c["state"], c.get("exitCode"), c.get("reason")) for c in containers}
        assert states == {
            "prep": ("exited", 0, "Completed"),
            "app": ("running", None, None),
            "job": ("exited", 3, "Error"),
        }
        await runtime.stop_pod(handle.id, grace=1)
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the forward went with the VM


@pytest.mark.slow
@needs_vm
async def test_third_party_extension_is_loaded_by_name_in_the_guest(
    paths: Paths, ext_path: Path
) -> None:
    await build_demo_images(paths)
    spec = PodSpec.from_yaml(
        infra_pod("vmrecorder", "recorder", {"app": "sleep 600"}, config={"recorder": '{"a": 1}'})
    )
    runtime = MicroVmPodRuntime(paths, network="user")
    handle = await runtime.run_pod(spec)
    try:
        state = pod_dir(paths, handle.id) / "infra" / "state" / "recorder"
        started = json.loads((state / "started").read_text())
        assert started == {"config": {"a": 1}, "ip": GUEST_IP}

        async def kinds() -> list[str]:
            path = state / "events.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            return [json.loads(line)["kind"] for line in lines]

        assert await wait_for(kinds, lambda k: len(k) >= 2) == [
            "ContainerCreated",
            "ContainerStarted",
        ]
        await runtime.stop_pod(handle.id, grace=2)
        events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
        assert [e["kind"] for e in events[2:]] == ["PodStopping", "ContainerExited"]
        assert events[2]["grace"] == 2
        assert (events[3]["name"], events[3]["exit_code"]) == ("app", 137)
        assert (state / "stopped").read_text() == "yes"
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}


@pytest.mark.slow
@needs_vm
async def test_failing_on_start_rolls_the_microvm_pod_back(paths: Paths, ext_path: Path) -> None:
    await build_demo_images(paths)
    port = free_port()
    spec = PodSpec.from_yaml(
        infra_pod(
            "vmfail",
            "health,failstart",
            {"app": "sleep 600"},
            config={"health": json.dumps({"port": 8080, "hostPort": port})},
        )
    )
    runtime = MicroVmPodRuntime(paths)
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec)
    assert "infra extension 'failstart' of pod default_vmfail failed to start" in str(caught.value)
    assert "OSError: the mesh is unreachable" in str(caught.value)
    assert caught.value.step == "infra"
    assert _leftovers(paths) == {}
    assert not pod_dir(paths, spec.id).exists()
    assert await runtime.list_pods() == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # health's forward went with the VM


LATE_PORT = """
import asyncio

from magikrun.infra import ContainerStarted, InfraExtension


class LatePort(InfraExtension):
    async def on_start(self, ctx):
        async def answer(reader, writer):
            writer.write(b"late\\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, ctx.pod_ip, 9090)

    async def on_event(self, event, ctx):
        if isinstance(event, ContainerStarted) and event.name == "app":
            await ctx.request_tcp_port(ctx.config["hostPort"], 9090)
            (ctx.state_dir / "opened").write_text("yes")

    async def on_stop(self, ctx):
        self.server.close()
"""


@pytest.mark.slow
@needs_vm
@pytest.mark.parametrize("network", ["bridge", "user"])
async def test_port_requested_after_start_is_opened(
    paths: Paths, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, network: str
) -> None:
    """A port asked for on an event, after ``on_start`` and the boot, is forwarded too
    (by CNI portmap on the bridge, by QEMU's hostfwd on user-mode networking)."""
    await build_demo_images(paths)
    ext = short_tmp / "late"
    (ext / "magikrun_late-1.0.dist-info").mkdir(parents=True)
    (ext / "magikrun_late.py").write_text(LATE_PORT)
    (ext / "magikrun_late-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: magikrun-late\nVersion: 1.0\n"
    )
    (ext / "magikrun_late-1.0.dist-info" / "entry_points.txt").write_text(
        "[magikrun.infra_extensions]\nlateport = magikrun_late:LatePort\n"
    )
    monkeypatch.setenv(INFRA_PATH_ENV, str(ext))
    port = free_port()
    spec = PodSpec.from_yaml(
        infra_pod(
            "vmlate",
            "lateport",
            {"app": "sleep 600"},
            config={"lateport": json.dumps({"hostPort": port})},
        )
    )
    runtime = MicroVmPodRuntime(paths, network=network)
    handle = await runtime.run_pod(spec)
    try:
        opened = pod_dir(paths, handle.id) / "infra" / "state" / "lateport" / "opened"

        async def greeting() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await reader.read()
            finally:
                writer.close()

        assert await wait_for(greeting, lambda data: data == b"late\n") == b"late\n"
        assert opened.read_text() == "yes"
    finally:
        await runtime.delete_pod(handle.id, force=True)
    assert _leftovers(paths) == {}


@pytest.mark.slow
@needs_vm
async def test_unknown_extension_fails_the_microvm_pod(paths: Paths) -> None:
    await build_demo_images(paths)
    spec = PodSpec.from_yaml(infra_pod("vmnope", "health,nope", {"app": "sleep 600"}))
    runtime = MicroVmPodRuntime(paths)
    with pytest.raises(InfraExtensionFailed) as caught:
        await runtime.run_pod(spec)  # before the boot: nothing of the pod was made
    assert caught.value.message == (
        f"infra extension 'nope' of pod {spec.id} failed to start: "
        "no infra extension named 'nope' (installed: health)"
    )
    assert _leftovers(paths) == {}
    assert await runtime.list_pods() == []


# -- vminit's side, without a VM ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("ContainerCreated", {"name": "app"}),
        ("ContainerStarted", {"name": "app", "pid": 42}),
        ("ContainerExited", {"name": "app", "exit_code": 3, "reason": "Error"}),
        ("ContainerRestarted", {"name": "app", "restart_count": 2}),
        ("PodStopping", {"grace": 2.5}),
        ("EventsDropped", {"count": 7}),
    ],
)
def test_guest_events_are_the_infra_programs_json(kind: str, fields: dict[str, Any]) -> None:
    written = event(kind, **fields)
    parsed = event_from_json(written)
    assert type(parsed).__name__ == kind
    assert event_to_json(parsed) == written


class _FakeSupervisor:
    """What InfraRelay uses of vminit's supervisor; the infra program is not started."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.argv: list[str] = []

    def spawn(self, argv: list[str], *args: Any) -> Process:
        self.argv = argv
        return Process(-1, lambda process: None)


def _run_until(loop: Loop, done: Any, limit: float = 10.0) -> None:
    def check() -> None:
        if done():
            loop.running = False
        else:
            loop.call_later(0.01, check)

    loop.running = True
    loop.call_later(0, check)
    loop.call_later(limit, lambda: setattr(loop, "running", False))
    loop.run()


def test_relay_buffers_events_boundedly_and_reports_drops(tmp_path: Path) -> None:
    config = tmp_path / "shared" / "pod.json"
    config.parent.mkdir()
    config.write_text('{"name": "p"}')
    directory = tmp_path / "infra"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    supervisor = _FakeSupervisor()
    seen: list[str] = []
    relay = InfraRelay(
        supervisor,  # type: ignore[arg-type]
        {"argv": ["python"], "config": str(config), "directory": str(directory)},
        max_buffer=4,
        max_message=1024,
        logs=LogBuffer(10),
        on_ready=lambda: seen.append("ready"),
        on_failed=lambda failure: seen.append(f"failed {failure}"),
        on_port=lambda message: seen.append(f"port {message['id']}"),
    )
    assert (directory / "pod.json").read_text() == '{"name": "p"}'
    assert (directory / "state").readlink() == config.parent / "state"
    listener.bind(str(directory / "infra.sock"))
    listener.listen()
    relay.send_event("ContainerCreated", name="early")  # before ready: not sent
    _run_until(supervisor.loop, lambda: relay._sock is not None)
    peer, _ = listener.accept()
    peer.sendall(b'{"type": "ready"}\n{"type": "port", "id": 9}\n')
    _run_until(supervisor.loop, lambda: len(seen) == 2)
    assert seen == ["ready", "port 9"]

    total = 20_000  # far more than the socket buffer holds while the peer does not read
    for index in range(total):
        relay.send_event("ContainerStarted", name="app", pid=index)
    assert relay.dropped_total > 0
    assert relay.status() == {"state": "ready", "dropped_events": relay.dropped_total}
    relay.port_result(9, None)  # never dropped, whatever the buffer holds

    received: list[dict[str, Any]] = []
    pending = b""
    peer.setblocking(False)

    def drained() -> bool:
        nonlocal pending
        try:
            pending += peer.recv(1 << 20)
        except BlockingIOError:
            pass
        *lines, pending = pending.split(b"\n")
        received.extend(json.loads(line) for line in lines)
        return any(m.get("event", {}).get("kind") == "EventsDropped" for m in received)

    _run_until(supervisor.loop, drained)
    started = [m for m in received if m.get("event", {}).get("kind") == "ContainerStarted"]
    dropped = [
        m["event"]["count"] for m in received if m.get("event", {}).get("kind") == "EventsDropped"
    ]
    assert dropped == [relay.dropped_total]
    assert len(started) + relay.dropped_total == total
    assert {"type": "port-result", "id": 9, "error": None} in received
    assert [m["event"]["pid"] for m in started] == sorted(m["event"]["pid"] for m in started)
    relay.process.exit_code = 0  # (nothing to TERM: the fake started no program)
    relay.shutdown()
    assert relay._sock is None
    peer.close()
    listener.close()


def test_relay_reports_a_program_that_ends_before_ready(tmp_path: Path) -> None:
    config = tmp_path / "pod.json"
    config.write_text("{}")
    failures: list[dict[str, Any]] = []
    supervisor = _FakeSupervisor()
    relay = InfraRelay(
        supervisor,  # type: ignore[arg-type]
        {"argv": ["python"], "config": str(config), "directory": str(tmp_path / "infra")},
        max_buffer=4,
        max_message=1024,
        logs=LogBuffer(10),
        on_ready=lambda: failures.append({"ready": True}),
        on_failed=failures.append,
        on_port=lambda message: None,
    )
    relay.logs.feed("stderr", b"Traceback ...\nModuleNotFoundError: No module named 'magikrun'")
    relay.process.exit_code = 1
    relay._exited(relay.process)
    assert relay.state == "failed"
    assert failures == [
        {
            "extension": None,
            "error": "the infra program exited with code 1: "
            "Traceback ... / ModuleNotFoundError: No module named 'magikrun'",
        }
    ]
