#!/usr/bin/env bash
# CI benchmark smoke (tiny models, one round) so bench/ and `parity bench` cannot rot. The numbers
# it prints mean nothing; real numbers come from `parity bench` (see docs/benchmarks.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
# 1. The pytest-benchmark suite: every tiny model x phase, eager / channels_last / jax.jit.
python -m pytest bench/ --bench-quick -q --benchmark-json "$TMP/pytest-benchmark.json"
# 2. The command end to end (JSON + markdown + PNG), with torch.compile on the smallest model
#    only: its first call alone costs ~30 s on two cores.
parity bench --quick --models mlp --variants torch-eager torch-compile jax-jit --out "$TMP/bench"
test -s "$TMP/pytest-benchmark.json"
ls "$TMP/bench"/*.json "$TMP/bench"/*.md "$TMP/bench"/*.png >/dev/null
echo "bench smoke: OK in $((SECONDS - START)) s"
