#!/usr/bin/env bash
# The test command: install what is needed, then run the pytest suite (extra args go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
# Two workers (pytest-xdist; at most 4 on bigger machines): each test is independent and
# starts its own child processes where it needs a fresh JAX; 307 s -> 247 s on the 2-core CI VM.
# --dist worksteal: each worker starts on one contiguous part of the suite (a module's tests stay
# together, so its module fixtures run once) and an idle worker takes half of another's
# remaining tests. (loadgroup would pin groups, but xdist 3.8 cannot rename pytest 9's node ids.)
python -m pytest --numprocesses=auto --maxprocesses=4 --dist worksteal "$@"
