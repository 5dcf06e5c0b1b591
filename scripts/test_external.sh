#!/usr/bin/env bash
# The external-pair battery (tests_external/: 23 tiny Hugging Face architectures built from
# configs and diffusers' Flax UNet2DCondition and AutoencoderKL built from constructor arguments,
# no network): every correct twin PASSes, every planted mis-port FAILs at its layer, every port
# round-trips bit-exact, and the upstream differences found are named. About 2.5 minutes on 2 cores; CI runs it beside the unit tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
python -m pytest tests_external --numprocesses=auto --maxprocesses=4 --dist worksteal -p no:cacheprovider "$@"
