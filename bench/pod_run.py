"""A 3-container busybox pod, run to all-running then stopped and removed: magikrun vs podman.

Images are cached on both sides (the demo busybox image in magikrun's store, the same
OCI layout copied into podman's storage with skopeo). Prints medians over RUNS runs
(default 10) of:

* ``magikrun pod run POD.yaml`` then ``magikrun pod rm --force`` (the CLI, a fresh
  interpreter per command, as a user runs it);
* ``run_pod`` then ``stop_pod`` + ``delete_pod`` through the Python API (one warm process);
* the peer, measured in the same run on the same YAML: ``podman kube play`` then
  ``podman kube down``;

each split into start (to all-running) and teardown, with the ratios against podman.
Then 20 such pods started concurrently through the API: all running, none leaked.

podman runs from a private storage root, ``containers.conf`` and CNI config directory
under a temporary directory (``nofile``/``nproc`` capped for this host, its kube network
moved off magikrun's 10.89.0.0/16); everything it made is removed at the end.

Usage: ``.venv/bin/python bench/pod_run.py [RUNS]`` (as root)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from magikrun.image import BUSYBOX_DEMO_REF, build_demo_images, write_demo_layout
from magikrun.platform import Paths
from magikrun.pod import PodPhase, PodSpec, open_pod_runtime

MAGIKRUN = Path(sys.executable).with_name("magikrun")
CONCURRENT = 20

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  terminationGracePeriodSeconds: 2
  containers:
{containers}
"""
CONTAINER = """\
    - name: c{index}
      image: {image}
      command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
"""

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
tmp_dir = "{tmp}/podman-tmp"

[network]
network_config_dir = "{tmp}/cni"
default_subnet_pools = [{{"base" = "10.188.0.0/16", "size" = 24}}]
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{tmp}/podman-storage"
runroot = "{tmp}/podman-run"
"""


def pod_yaml(name: str) -> str:
    containers = "".join(CONTAINER.format(index=i, image=BUSYBOX_DEMO_REF) for i in (1, 2, 3))
    return POD_YAML.format(name=name, containers=containers)


def run(argv: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, env=env, timeout=120)


def timed_pair(start: Callable[[], None], stop: Callable[[], None]) -> tuple[float, float]:
    t0 = time.perf_counter()
    start()
    t1 = time.perf_counter()
    stop()
    return t1 - t0, time.perf_counter() - t1


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True)
    return {line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()}


def iptables_chains() -> set[str]:
    out = subprocess.run(["iptables", "-S"], check=True, capture_output=True, text=True)
    return {line.split()[1] for line in out.stdout.splitlines() if line.startswith("-N ")}


def netns() -> set[str]:
    base = Path("/run/netns")
    return {p.name for p in base.iterdir()} if base.is_dir() else set()


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f" {root}" in line]


class Podman:
    """podman with private storage, config and CNI directory under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "cni").mkdir()
        conf = tmp / "containers.conf"
        conf.write_text(CONTAINERS_CONF.format(tmp=tmp))
        storage = tmp / "storage.conf"
        storage.write_text(STORAGE_CONF.format(tmp=tmp))
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
        }
        self.links_before = links()
        self.chains_before = iptables_chains()

    def load(self, layout: Path) -> None:
        run(
            [
                "skopeo",
                "copy",
                "-q",
                f"oci:{layout}:{BUSYBOX_DEMO_REF}",
                f"containers-storage:{BUSYBOX_DEMO_REF}",
            ],
            self.env,
        )

    def play(self, manifest: Path) -> None:
        run(["podman", "kube", "play", str(manifest)], self.env)

    def down(self, manifest: Path) -> None:
        run(["podman", "kube", "down", str(manifest)], self.env)

    def clean(self) -> None:
        """Remove podman's pods, containers, kube network, bridge and firewall chains."""
        for argv in (
            ["podman", "pod", "rm", "--all", "--force"],
            ["podman", "network", "rm", "--force", "podman-default-kube-network"],
            ["podman", "system", "reset", "--force"],
        ):
            subprocess.run(argv, capture_output=True, env=self.env, timeout=120)
        for link in links() - self.links_before:
            if link.startswith("cni-podman"):
                run(["ip", "link", "del", link])
        new = iptables_chains() - self.chains_before
        if "CNI-FORWARD" in new:
            run(
                [
                    "iptables",
                    "-D",
                    "FORWARD",
                    "-m",
                    "comment",
                    "--comment",
                    "CNI firewall plugin rules",
                    "-j",
                    "CNI-FORWARD",
                ]
            )
        for chain in ("CNI-FORWARD", "CNI-ADMIN"):
            if chain in new:
                run(["iptables", "-F", chain])
        for chain in ("CNI-FORWARD", "CNI-ADMIN"):
            if chain in new:
                run(["iptables", "-X", chain])


async def api_cycle(paths: Paths, spec: PodSpec) -> tuple[float, float]:
    runtime = open_pod_runtime(paths, "native")
    t0 = time.perf_counter()
    handle = await runtime.run_pod(spec)
    t1 = time.perf_counter()
    await runtime.stop_pod(handle.id)
    await runtime.delete_pod(handle.id)
    return t1 - t0, time.perf_counter() - t1


async def concurrent(paths: Paths) -> None:
    runtime = open_pod_runtime(paths, "native")
    specs = [PodSpec.from_yaml(pod_yaml(f"bench-many-{i}").encode()) for i in range(CONCURRENT)]
    netns_before = netns()
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(runtime.run_pod(spec)) for spec in specs]
    started = time.perf_counter() - t0
    statuses = [await runtime.pod_status(t.result().id) for t in tasks]
    running = sum(
        1
        for s in statuses
        if s.phase is PodPhase.RUNNING and all(c.state == "running" for c in s.containers)
    )
    t1 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for t in tasks:
            group.create_task(runtime.delete_pod(t.result().id, force=True))
    removed = time.perf_counter() - t1
    left = await runtime.list_pods()
    leaked_netns = netns() - netns_before
    leaked_mounts = mounts_under(paths.run) + mounts_under(paths.data)
    print(
        f"{CONCURRENT} pods at once (API): all started in {started * 1000:.0f} ms, "
        f"{running}/{CONCURRENT} with every container running; removed in "
        f"{removed * 1000:.0f} ms; left: {len(left)} pods, {len(leaked_netns)} netns, "
        f"{len(leaked_mounts)} mounts"
    )
    if running != CONCURRENT or left or leaked_netns or leaked_mounts:
        raise SystemExit("concurrent pods: not all ran or something leaked")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory(prefix="magikrun-bench-pod-") as tmp_name:
        tmp = Path(tmp_name)
        paths = Paths.resolve(str(tmp / "root")).ensure()
        asyncio.run(build_demo_images(paths))
        write_demo_layout(tmp / "layout")
        manifest = tmp / "pod.yaml"
        manifest.write_text(pod_yaml("bench"))
        spec = PodSpec.from_yaml(manifest.read_bytes())
        cli = [str(MAGIKRUN), "--root", str(tmp / "root")]
        podman = Podman(tmp)
        try:
            podman.load(tmp / "layout")
            cases: dict[str, Callable[[], tuple[float, float]]] = {
                "podman kube play + kube down": lambda: timed_pair(
                    lambda: podman.play(manifest), lambda: podman.down(manifest)
                ),
                "magikrun pod run + pod rm --force (CLI)": lambda: timed_pair(
                    lambda: run([*cli, "pod", "run", str(manifest)]),
                    lambda: run([*cli, "pod", "rm", "--force", "bench"]),
                ),
                "magikrun run_pod + stop_pod + delete_pod (API)": lambda: asyncio.run(
                    api_cycle(paths, spec)
                ),
            }
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
            for case in cases.values():  # warm-up: podman builds its pause image here
                case()
            for _ in range(runs):
                for name, case in cases.items():
                    samples[name].append(case())
            peer = "podman kube play + kube down"
            peer_start = ms([s[0] for s in samples[peer]])
            peer_total = ms([s[0] + s[1] for s in samples[peer]])
            print(f"3-container busybox pod, medians of {runs} runs (images cached)")
            print(f"{'':48} {'start':>9} {'teardown':>9} {'total':>9}  vs podman")
            for name, pairs in samples.items():
                start = ms([s[0] for s in pairs])
                down = ms([s[1] for s in pairs])
                total = ms([s[0] + s[1] for s in pairs])
                print(
                    f"{name:48} {start:7.1f}ms {down:7.1f}ms {total:7.1f}ms  "
                    f"start {start / peer_start:.2f}x, total {total / peer_total:.2f}x"
                )
            asyncio.run(concurrent(paths))
        finally:
            podman.clean()


if __name__ == "__main__":
    main()
