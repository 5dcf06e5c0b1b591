#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the tested pins. Sourced by the other
# scripts; safe to re-run (pip is a no-op when everything is already satisfied).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.installed-$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  python -m pip install --quiet --upgrade pip
  # torch==2.13.0 in constraints.txt resolves to the local CPU wheel; unpinned it would pull CUDA.
  python -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  rm -f "$ROOT"/.venv/.installed-*
  touch "$STAMP"
fi
