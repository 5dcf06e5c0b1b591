#!/usr/bin/env bash
# The test command: install what is needed, then run the pytest suite (extra args go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
python -m pytest "$@"
