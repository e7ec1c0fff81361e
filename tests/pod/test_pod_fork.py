"""A native pod started from a single-threaded process forks its container monitors.

Forking the warm interpreter is the fast path of ``start_monitor``; it is taken only
while the caller has one thread, so the pod path must leave no thread behind (see
``magikrun._threads``). pytest-xdist's workers have a second thread, so the pod runs
in a fresh interpreter, as the CLI and the benchmark run it. A forked monitor keeps its
caller's command line; an exec'd one runs ``_monitor.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import requires_root
from tests.pod._podkit import PodEnv, busybox, pod_yaml, unique

pytestmark = [requires_root, pytest.mark.root]

CALLER = """
import asyncio, json, os, sys
from magikrun.platform import Paths
from magikrun.pod import NativePodRuntime, PodNetwork, PodSpec
from magikrun.pod._base import container_id, infra_id

root, bridge, subnet, manifest = sys.argv[1:]

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode()

async def main():
    paths = Paths.resolve(root)
    network = PodNetwork(paths, bridge=bridge, subnet=subnet)
    runtime = NativePodRuntime(paths, network=network)
    spec = PodSpec.from_yaml(manifest.encode())
    out = {"threads_before": len(os.listdir("/proc/self/task")), "caller": cmdline("self")}
    handle = await runtime.run_pod(spec)
    out["threads_after"] = len(os.listdir("/proc/self/task"))
    ids = [infra_id(handle.id)] + [container_id(handle.id, c.name) for c in spec.containers]
    out["monitors"] = [cmdline(runtime.containers.load(i).monitor_pid) for i in ids]
    status = await runtime.pod_status(handle.id)
    out["states"] = [c.state for c in status.containers]
    await runtime.delete_pod(handle.id, force=True)
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_native_pod_from_a_single_threaded_caller_forks_every_monitor(env: PodEnv) -> None:
    containers = "".join(busybox(f"c{i}", "exec sleep 1000") for i in (1, 2, 3))
    manifest = pod_yaml(unique(), containers)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CALLER,
            str(env.paths.data),
            env.bridge,
            env.subnet,
            manifest.decode(),
        ],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    assert out["threads_before"] == 1
    assert out["states"] == ["running"] * 3
    assert len(out["monitors"]) == 4
    assert all(m == out["caller"] for m in out["monitors"]), out["monitors"]
    assert out["threads_after"] == 1
    assert env.leftovers() == {}
