#!/usr/bin/env bash
# The README's first command: set everything up, build the embedded demo images (busybox
# from Debian's busybox-static, a WASI hello-world module) offline and import them, then
# run the demo pods in examples/ (a native pod of two containers sharing an emptyDir, a
# wasm pod, and a microVM pod where QEMU and a guest kernel exist), show their status and
# logs, and remove them. Idempotent: demo pods left by an interrupted run are removed
# first. Uses $MAGIKRUN_ROOT if set, else the default root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

./scripts/setup.sh
magikrun=.venv/bin/magikrun
pods=(demo-native demo-wasm)
if .venv/bin/python -c 'import sys; from magikrun.runtime import RuntimeRegistry; from magikrun.platform import Paths; sys.exit(RuntimeRegistry(Paths.resolve()).backend("microvm").unavailable_reason() is not None)'; then
    microvm=yes # QEMU and a guest kernel are there
else
    microvm=no
fi

remove_demo_pods() {
    for pod in "${pods[@]}" demo-microvm; do
        if "$magikrun" pod status "$pod" >/dev/null 2>&1; then
            "$magikrun" pod rm --force "$pod" >/dev/null
        fi
    done
}

step() {
    echo
    echo "== magikrun $*"
    "$magikrun" "$@"
}

remove_demo_pods
trap remove_demo_pods EXIT

step image demo
step image ls

step pod run examples/demo-native.yaml
step pod run examples/demo-wasm.yaml
if [[ $microvm == yes ]]; then
    step pod run examples/demo-microvm.yaml
    echo "== curl http://127.0.0.1:18080/message (the microVM pod's hostPort)"
    # httpd may still be starting, or answer 404 before the writer's first message:
    # retry quietly on any error, fail loudly
    curl -fs --retry 10 --retry-all-errors --retry-delay 1 http://127.0.0.1:18080/message ||
        { echo "demo: the microVM pod's hostPort did not answer" >&2; exit 1; }
    step pod exec demo-microvm -c web -- cat /data/message
    step pod stop demo-microvm
    step pod rm demo-microvm
fi
sleep 3 # the writer writes a message a second, the reader logs what it finds
step pod ls
for pod in "${pods[@]}"; do
    step pod status "$pod"
    step pod logs "$pod"
done
step pod exec demo-native -c reader -- cat /data/message

step pod stop demo-native
step pod rm demo-native
step pod rm demo-wasm
step pod ls
trap - EXIT
echo
echo "demo: done"
