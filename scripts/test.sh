#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite in parallel.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$here/scripts/setup.sh"
cd "$here"
exec .venv/bin/python -m pytest -n "${MAGIKRUN_TEST_WORKERS:-auto}" "$@"
