"""The shipped ``health`` extension in a native pod (real crun, CNI bridge and portmap)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from magikrun.pod import PodSpec
from tests.infra._kit import free_port, get_json, infra_pod, wait_for
from tests.pod._podkit import PodEnv, unique


def _states(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["containers"]}


async def test_health_sees_starts_and_exits_and_is_reachable(env: PodEnv) -> None:
    host_port = free_port()
    runtime = env.native()
    spec = PodSpec.from_yaml(
        infra_pod(
            unique(),
            "health",
            {"fail": "exit 3", "run": "sleep 600"},
            config={"health": json.dumps({"port": 8080, "hostPort": host_port})},
        )
    )
    handle = await runtime.run_pod(spec)
    assert handle.ip is not None

    ip = handle.ip

    def settled(doc: dict[str, Any]) -> bool:
        states = _states(doc)
        return (
            states.get("fail", {}).get("state") == "exited"
            and states.get("run", {}).get("state") == "running"
        )

    doc = await wait_for(lambda: get_json(ip, 8080), settled)
    states = _states(doc)
    assert states["fail"]["exitCode"] == 3 and states["fail"]["reason"] == "Error"
    assert states["run"]["pid"] > 0 and "exitCode" not in states["run"]
    assert doc["pod"] == {"name": spec.name, "namespace": "default", "ip": handle.ip}
    containers = await get_json("127.0.0.1", host_port, "/containers")
    assert [c["name"] for c in containers] == ["fail", "run"]
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert f"--dport {host_port}" in rules

    await runtime.stop_pod(handle.id)
    await runtime.delete_pod(handle.id)
    assert env.leftovers() == {}
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert f"--dport {host_port}" not in rules


async def test_health_counts_restarts(env: PodEnv) -> None:
    runtime = env.native()
    spec = PodSpec.from_yaml(infra_pod(unique(), "health", {"flap": "exit 4"}, restart="OnFailure"))
    handle = await runtime.run_pod(spec)
    assert handle.ip is not None
    ip = handle.ip

    def restarted(doc: dict[str, Any]) -> bool:
        flap = _states(doc).get("flap", {})
        return flap.get("restartCount", 0) >= 2 and flap.get("state") == "exited"

    doc = await wait_for(lambda: get_json(ip, 8080), restarted)
    assert _states(doc)["flap"]["exitCode"] == 4
    await runtime.delete_pod(handle.id, force=True)
    assert env.leftovers() == {}
