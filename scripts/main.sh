#!/usr/bin/env bash
# The main job: install, run `parity check all` on the built-in models, then a quick benchmark.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
parity check all
if parity bench --help >/dev/null 2>&1; then
  parity bench --quick --out "$ROOT/out/bench"
fi
