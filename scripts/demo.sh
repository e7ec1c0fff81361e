#!/usr/bin/env bash
# The README's first command: set everything up, then build the embedded demo images
# (busybox from Debian's busybox-static, a WASI hello-world module) offline, import
# them and show them. Idempotent. Uses $MAGIKRUN_ROOT if set, else magikrun's default root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

./scripts/setup.sh
magikrun=.venv/bin/magikrun

echo "== magikrun image demo"
"$magikrun" image demo
echo
echo "== magikrun image ls"
"$magikrun" image ls
for ref in magikrun.local/busybox:demo magikrun.local/hello-wasm:demo; do
    echo
    echo "== magikrun image inspect $ref"
    "$magikrun" image inspect "$ref"
done
