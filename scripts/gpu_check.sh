#!/usr/bin/env bash
# GPU results in one script (issue 11): on one CUDA card, in one go,
#   1. `parity check all` on cuda: float32 with TF32 off, float32 with TF32 on, and bfloat16
#      judged against a float64 reference;
#   2. the benchmark at GPU sizes (UNet 3x256x256 b8, the ViT pair at ViT-B/16 size b32 when the
#      registry has one, CNN and MLP at large batches): a float32 run and a labelled bf16 run,
#      with MFU against the card's peak (parity/benchmark/peaks.py);
#   3. the per-layer speed profile of the UNet (parity bench --layers).
# Everything lands under bench/results/ (or --out DIR), named by device, dtype and versions.
#
#   scripts/gpu_check.sh                 # stage times are printed; ~640 s on one H200 (2026-11-26)
#   scripts/gpu_check.sh --with-compile  # also torch.compile in the float32 run (adds minutes)
#   scripts/gpu_check.sh --dry-run       # the same pipeline on CPU, tiny sizes, into a temp dir
#   scripts/gpu_check.sh --only checks,bench-float32   # some stages (checks, bench-float32,
#                                        # bench-bfloat16, layers), e.g. to fit a per-call time limit
#
# Python: $PARITY_PYTHON when set (a GPU box needs CUDA builds of torch and jax, which the CPU
# pins in constraints.txt do not give), else the project's .venv via scripts/env.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
COMPILE=0
OUT=""
ONLY="checks,bench-float32,bench-bfloat16,layers"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --with-compile) COMPILE=1 ;;
    --out) OUT="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for st in ${ONLY//,/ }; do
  case "$st" in
    checks|bench-float32|bench-bfloat16|layers) ;;
    *) echo "gpu_check.sh: unknown stage $st in --only (checks, bench-float32, bench-bfloat16, layers)" >&2; exit 2 ;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
if [ -n "${PARITY_PYTHON:-}" ]; then
  PY="$PARITY_PYTHON"
else
  . "$ROOT/scripts/env.sh"
  PY=python
fi
cd "$ROOT"
START=$SECONDS



if [ "$DRY" = 1 ]; then
  # Same stages, same flags, on CPU at tiny sizes: it proves the pipeline runs, not the numbers.
  export JAX_PLATFORMS=cpu
  DEVICE=cpu
  if [ -z "$OUT" ]; then OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT; fi
  CHECK_MODELS=(mlp)
  BENCH_MODELS=(mlp)
  SIZE=(--size tiny --batch 2 --quick)
  # The profile's code path is the same for every pair; the CNN's is the quickest to compile.
  PROFILE=(--layers cnn --size tiny --batch 2 --quick)
  # CPUs have no peak table: a made-up peak exercises the MFU path (the number means nothing).
  PEAK=(--peak-tflops 0.1)
else
  DEVICE=cuda
  OUT="${OUT:-$ROOT/bench/results}"
  "$PY" - <<'PYEOF'
import sys

import jax
import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
try:
    gpus = jax.devices("gpu")
except RuntimeError as exc:
    sys.exit(f"gpu_check.sh: JAX {jax.__version__} has no GPU backend: {exc}")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; jax {jax.__version__} on {gpus[0].device_kind}")
PYEOF
  CHECK_MODELS=(all)
  BENCH_MODELS=(mlp cnn unet-same)
  # The ViT pair joins when the registry has one (issue 9 adds it).
  if "$PY" -c 'import sys; from parity.registry import PAIRS; sys.exit(0 if any(p.family == "vit" for p in PAIRS.values()) else 1)'; then
    BENCH_MODELS+=(vit)
  fi
  SIZE=(--size gpu --min-time 0.5)
  PROFILE=(--layers unet-same --size gpu)
  PEAK=()
fi
mkdir -p "$OUT"
# File stems by device and versions, one interpreter start for all of them.
LABELS=(float32-tf32-off float32-tf32-on bfloat16-fp64-reference float32 bfloat16)
mapfile -t STEMS < <("$PY" -c 'import sys; from parity.benchmark.report import device_file_stem
for label in sys.argv[2:]: print(device_file_stem(sys.argv[1], label))' "$DEVICE" "${LABELS[@]}")
stem() { local i; for i in "${!LABELS[@]}"; do if [ "${LABELS[$i]}" = "$1" ]; then echo "${STEMS[$i]}"; fi; done; }

FAILED=()
# stage LOG ARGS...: `parity ARGS...` with its output also in LOG. A failing stage is recorded
# and the others still run (a TF32 parity miss must not cost the benchmark numbers).
stage() {
  local log="$1"; shift
  echo; echo "=== [$((SECONDS - START)) s] parity $*"
  if ! "$PY" -m parity.cli "$@" 2>&1 | tee "$log"; then FAILED+=("$(basename "$log" .log)"); fi
}

# 1. Parity on the device. TF32 off = JAX 'highest'; TF32 on = JAX 'default' (TF32 passes on
#    Ampere and later), torch's allow_tf32 set to match by the checker; each JSON report records
#    the flags it ran under. The three modes are correctness runs, not timings, so they run at
#    the same time (their time is mostly compilation, which is CPU work); JAX's 75% up-front
#    claim on the card's memory is switched off for them so that three processes fit.
if want checks; then
  echo; echo "=== [$((SECONDS - START)) s] parity check ${CHECK_MODELS[*]}: three modes at once"
  PIDS=()
  NAMES=()
  for spec in "float32-tf32-off:--dtype float32 --precision highest" \
              "float32-tf32-on:--dtype float32 --precision default" \
              "bfloat16-fp64-reference:--dtype bfloat16 --fp64-reference"; do
    label="${spec%%:*}"
    read -r -a flags <<< "${spec#*:}"
    name="check_$(stem "$label")"
    XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m parity.cli check "${CHECK_MODELS[@]}" --device "$DEVICE" \
      "${flags[@]}" --json "$OUT/$name.json" --quiet >"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
  done
  for i in "${!PIDS[@]}"; do
    if ! wait "${PIDS[$i]}"; then FAILED+=("${NAMES[$i]}"); fi
    echo "--- ${NAMES[$i]}"; cat "$OUT/${NAMES[$i]}.log"
  done
  echo "=== [$((SECONDS - START)) s] checks done"
fi

# 2. The benchmark at GPU sizes; every variant's first result is checked against jax.jit's.
VARIANTS=(torch-eager torch-channels_last jax-jit)
if [ "$COMPILE" = 1 ]; then VARIANTS+=(torch-compile); fi
want bench-float32 && stage "$OUT/bench_$(stem float32).log" bench --device "$DEVICE" --models "${BENCH_MODELS[@]}" \
  "${SIZE[@]}" "${PEAK[@]}" --variants "${VARIANTS[@]}" --out "$OUT"
want bench-bfloat16 && stage "$OUT/bench_$(stem bfloat16).log" bench --device "$DEVICE" --models "${BENCH_MODELS[@]}" --bf16 \
  "${SIZE[@]}" "${PEAK[@]}" --variants torch-eager torch-channels_last jax-jit --out "$OUT"

# 3. Where the UNet's time goes, layer by layer, on both sides.
want layers && stage "$OUT/layers_$(stem float32).log" bench --device "$DEVICE" "${PROFILE[@]}" --out "$OUT"

echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]} ($((SECONDS - START)) s; results in $OUT)"
  exit 1
fi
if want checks; then ls "$OUT"/check_*.json >/dev/null; fi
if want bench-float32 || want bench-bfloat16 || want layers; then ls "$OUT"/*.md "$OUT"/*.png >/dev/null; fi
echo "gpu_check: OK in $((SECONDS - START)) s; results in $OUT"
