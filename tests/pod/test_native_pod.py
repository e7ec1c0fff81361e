"""NativePodRuntime with real crun, real CNI plugins and the demo busybox image, as root."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from magikrun.errors import PodError, PodExists, PodStartFailed
from magikrun.pod import PodPhase, find_pod, open_pod_runtime
from magikrun.pod._base import container_id
from tests.conftest import requires_root
from tests.pod._podkit import (
    BUSYBOX,
    CGROUP_ROOT,
    FAILING_INIT,
    PodEnv,
    busybox,
    check_init_failure,
    pod_yaml,
    spec,
    unique,
    wait_for,
)

pytestmark = [requires_root, pytest.mark.root]

SLEEP = "sleep 1000"


async def test_pod_shares_emptydir_logs_exec_status_and_leaves_nothing(env: PodEnv) -> None:
    name = unique()
    manifest = pod_yaml(
        name,
        busybox(
            "writer",
            "echo hello > /data/x; echo started; exec sleep 1000",
            "    volumeMounts: [{name: shared, mountPath: /data}]\n",
        )
        + busybox(
            "reader",
            SLEEP,
            "    volumeMounts: [{name: shared, mountPath: /data, readOnly: true}]\n"
            "    env: [{name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}},\n"
            "          {name: MY_HOST, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}]\n",
        ),
        "  volumes: [{name: shared, emptyDir: {}}]\n",
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    assert handle.ip is not None and handle.runtime == "native"
    assert find_pod(env.paths, name) == handle.id

    async def written() -> bool:
        result = await runtime.exec(handle.id, "reader", ["cat", "/data/x"])
        return result.stdout == b"hello\n"

    await wait_for(written)
    status = await runtime.pod_status(handle.id)
    assert status.phase is PodPhase.RUNNING
    assert [c.state for c in status.containers] == ["running", "running"]
    env_out = await runtime.exec(handle.id, "reader", ["sh", "-c", "echo $MY_IP; hostname"])
    assert env_out.stdout.decode().split() == [handle.ip, name]
    route = await runtime.exec(handle.id, "reader", ["sh", "-c", "echo $MY_HOST; ip route"])
    host_ip, routes = route.stdout.decode().split("\n", 1)
    assert f"default via {host_ip} " in routes  # the host, as the pod reaches it
    refused = await runtime.exec(handle.id, "reader", ["touch", "/data/y"])
    assert refused.exit_code != 0
    hosts = await runtime.exec(handle.id, "writer", ["cat", "/etc/hosts"])
    assert handle.ip in hosts.stdout.decode()
    lines = [line async for line in runtime.logs(handle.id, "writer")]
    assert [(x.container, x.stream, x.text) for x in lines] == [("writer", "stdout", "started")]
    assert [s.id for s in await runtime.list_pods()] == [handle.id]
    with pytest.raises(PodError, match="is running"):
        await runtime.delete_pod(handle.id)
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
    await runtime.delete_pod(handle.id, force=True)


async def test_third_container_without_its_command_fails_and_runs_nothing(env: PodEnv) -> None:
    manifest = pod_yaml(
        unique(),
        busybox("one", SLEEP)
        + busybox("two", SLEEP)
        + f"  - name: three\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n"
        "    command: [/no/such/program]\n",
    )
    runtime = env.native()
    with pytest.raises(PodStartFailed) as caught:
        await runtime.run_pod(spec(manifest))
    assert caught.value.container == "three"
    assert caught.value.step == "create"
    assert "/no/such/program" in str(caught.value)
    assert env.leftovers() == {}


async def test_running_a_taken_name_leaves_the_existing_pod_untouched(env: PodEnv) -> None:
    name = unique()
    runtime = env.native()
    handle = await runtime.run_pod(spec(pod_yaml(name, busybox("main", SLEEP))))
    before = await runtime.pod_status(handle.id)
    with pytest.raises(PodExists):
        await runtime.run_pod(spec(pod_yaml(name, busybox("other", SLEEP))))
    after = await runtime.pod_status(handle.id)
    assert after.phase is PodPhase.RUNNING
    assert [c.name for c in after.containers] == ["main"]
    assert after.containers[0].started_at == before.containers[0].started_at
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_two_pods_on_one_image_talk_over_the_bridge_and_a_host_port(env: PodEnv) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host_port = sock.getsockname()[1]
    server = pod_yaml(
        unique("srv"),
        busybox(
            "web",
            "mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www",
            f"    ports: [{{containerPort: 8080, hostPort: {host_port}}}]\n",
        ),
    )
    runtime = env.native()
    srv = await runtime.run_pod(spec(server))
    client = await runtime.run_pod(spec(pod_yaml(unique("cli"), busybox("main", SLEEP))))
    assert srv.ip != client.ip

    async def served() -> bool:
        result = await runtime.exec(
            client.id, None, ["wget", "-q", "-O", "-", f"http://{srv.ip}:8080/"]
        )
        return result.stdout == b"served\n"

    await wait_for(served)

    def fetch() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=10) as reply:
            return bytes(reply.read())

    assert await asyncio.to_thread(fetch) == b"served\n"
    for handle in (srv, client):
        await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_configmap_and_secret_files(env: PodEnv) -> None:
    name = unique()
    manifest = pod_yaml(
        name,
        busybox(
            "main",
            SLEEP,
            "    volumeMounts:\n"
            "    - {name: conf, mountPath: /conf}\n"
            "    - {name: creds, mountPath: /creds}\n"
            "    - {name: conf, mountPath: /one/app.conf, subPath: app.conf}\n",
        ),
        "  volumes:\n"
        "  - {name: conf, configMap: {name: settings}}\n"
        "  - {name: creds, secret: {secretName: token}}\n",
    ) + (
        b"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n"
        b"data: {app.conf: 'level=debug'}\n"
        b"---\napiVersion: v1\nkind: Secret\nmetadata: {name: token}\n"
        b"data: {password: c2VjcmV0}\n"
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    result = await runtime.exec(
        handle.id,
        None,
        [
            "sh",
            "-c",
            "cat /conf/app.conf; echo; cat /one/app.conf; echo; cat /creds/password; echo; "
            "stat -c %a /creds/password",
        ],
    )
    assert result.stdout.decode().split() == ["level=debug", "level=debug", "secret", "400"]
    secret_dir = env.paths.run / "pods" / handle.id / "volumes" / "creds"
    assert f" {secret_dir} " in Path("/proc/self/mountinfo").read_text()
    assert "tmpfs" in [
        line.split(" - ")[1].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f" {secret_dir} " in line
    ]
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_init_containers_run_in_order_before_the_app(env: PodEnv) -> None:
    extra = (
        "  volumes: [{name: shared, emptyDir: {medium: Memory}}]\n"
        "  initContainers:\n"
        + busybox(
            "first",
            "echo first >> /data/order",
            "    volumeMounts: [{name: shared, mountPath: /data}]\n",
        )
        + busybox(
            "second",
            "echo second >> /data/order",
            "    volumeMounts: [{name: shared, mountPath: /data}]\n",
        )
    )
    manifest = pod_yaml(
        unique(),
        busybox("main", SLEEP, "    volumeMounts: [{name: shared, mountPath: /data}]\n"),
        extra,
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    result = await runtime.exec(handle.id, "main", ["cat", "/data/order"])
    assert result.stdout == b"first\nsecond\n"
    status = await runtime.pod_status(handle.id)
    assert [(c.name, c.init, c.state, c.exit_code) for c in status.containers] == [
        ("first", True, "terminated", 0),
        ("second", True, "terminated", 0),
        ("main", False, "running", None),
    ]
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_failing_init_container_fails_the_pod_with_its_output_and_nothing_left(
    env: PodEnv,
) -> None:
    extra = "  initContainers:\n" + busybox("setup", FAILING_INIT)
    manifest = pod_yaml(unique(), busybox("main", SLEEP), extra)
    with pytest.raises(PodStartFailed) as caught:
        await env.native().run_pod(spec(manifest))
    check_init_failure(caught.value)
    assert env.leftovers() == {}


async def test_silent_failing_init_container_says_it_printed_nothing(env: PodEnv) -> None:
    extra = "  initContainers:\n" + busybox("setup", "exit 7")
    manifest = pod_yaml(unique(), busybox("main", SLEEP), extra)
    with pytest.raises(PodStartFailed) as caught:
        await env.native().run_pod(spec(manifest))
    assert caught.value.message.endswith(
        "failed: init container 'setup' exited with code 7; it printed nothing; "
        f"undone: {len(caught.value.undone)} resource(s), nothing is left"
    )
    assert (caught.value.exit_code, caught.value.output) == (7, "")
    assert env.leftovers() == {}


async def test_on_failure_restarts_with_growing_count_never_does_not(env: PodEnv) -> None:
    runtime = env.native()
    failing = await runtime.run_pod(
        spec(pod_yaml(unique(), busybox("crash", "sleep 0.2; exit 3"), restart="OnFailure"))
    )

    async def restarted_twice() -> bool:
        status = await runtime.pod_status(failing.id)
        return status.containers[0].restart_count >= 2

    await wait_for(restarted_twice)
    status = await runtime.pod_status(failing.id)
    assert status.phase is PodPhase.RUNNING
    once = await runtime.run_pod(
        spec(pod_yaml(unique(), busybox("crash", "exit 3"), restart="Never"))
    )

    async def failed() -> bool:
        return (await runtime.pod_status(once.id)).phase is PodPhase.FAILED

    await wait_for(failed)
    status = await runtime.pod_status(once.id)
    assert (status.containers[0].exit_code, status.containers[0].restart_count) == (3, 0)
    for handle in (failing, once):
        await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_memory_limit_is_in_the_container_cgroup(env: PodEnv) -> None:
    manifest = pod_yaml(
        unique(),
        busybox("main", SLEEP, "    resources: {limits: {memory: 64Mi, cpu: 500m}}\n"),
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    leaf = f"magikrun/{env.tag}-{container_id(handle.id, 'main')}"
    v1 = CGROUP_ROOT / "memory" / leaf / "memory.limit_in_bytes"
    v2 = CGROUP_ROOT / leaf / "memory.max"
    limit = (v1 if v1.exists() else v2).read_text().strip()
    assert int(limit) == 64 * 1024 * 1024
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}


async def test_stop_honours_grace_then_kills(env: PodEnv) -> None:
    manifest = pod_yaml(
        unique(),
        busybox("polite", "trap 'exit 3' TERM; while true; do sleep 0.1; done")
        + busybox("stubborn", "trap '' TERM; while true; do sleep 0.1; done"),
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    await runtime.stop_pod(handle.id, grace=1.0)
    status = await runtime.pod_status(handle.id)
    assert [(c.name, c.state, c.exit_code) for c in status.containers] == [
        ("polite", "terminated", 3),
        ("stubborn", "terminated", 137),
    ]
    assert status.phase is PodPhase.FAILED
    await runtime.stop_pod(handle.id, grace=1.0)
    await runtime.delete_pod(handle.id)
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}


async def test_open_pod_runtime_by_name_and_class(env: PodEnv) -> None:
    assert open_pod_runtime(env.paths, "magikrun-native").name == "native"
    assert open_pod_runtime(env.paths, "wasm").name == "wasm"
    wasm_spec = spec(
        b"apiVersion: v1\nkind: Pod\nmetadata: {name: w}\nspec:\n  containers:\n"
        b"  - {name: m, image: 'magikrun.local/hello-wasm:demo'}\n"
    )
    assert open_pod_runtime(env.paths, spec=wasm_spec).name == "wasm"
    assert open_pod_runtime(env.paths, "native", spec=wasm_spec).name == "native"
    from magikrun.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="magikrun-wasm"):
        open_pod_runtime(env.paths, "kata")


async def test_logs_tail_and_follow(env: PodEnv) -> None:
    manifest = pod_yaml(
        unique(),
        busybox("talk", "for i in 1 2 3 4; do echo line$i; done; echo oops >&2; sleep 1; echo end"),
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    followed = [(x.stream, x.text) async for x in runtime.logs(handle.id, follow=True)]
    assert followed == [
        ("stdout", "line1"),
        ("stdout", "line2"),
        ("stdout", "line3"),
        ("stdout", "line4"),
        ("stderr", "oops"),
        ("stdout", "end"),
    ]
    tail = [x.text async for x in runtime.logs(handle.id, "talk", tail=2)]
    assert tail == ["oops", "end"]
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}


async def test_share_process_namespace_and_host_network(env: PodEnv) -> None:
    manifest = pod_yaml(
        unique(),
        busybox("one", "exec sleep 1001") + busybox("two", "exec sleep 1002"),
        "  shareProcessNamespace: true\n  hostNetwork: true\n",
    )
    runtime = env.native()
    handle = await runtime.run_pod(spec(manifest))
    assert handle.ip is None
    seen = await runtime.exec(handle.id, "two", ["ps", "-o", "args"])
    assert "sleep 1001" in seen.stdout.decode() and "magikrun.infra" in seen.stdout.decode()
    netns = await runtime.exec(handle.id, "one", ["readlink", "/proc/self/ns/net"])
    assert netns.stdout.decode().strip() == os.readlink("/proc/self/ns/net")
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
