#!/usr/bin/env bash
# The GPU checks, on a CUDA machine (an NVIDIA GPU with MLX's CUDA backend):
#   1. install mlx[cuda] into .venv (./setup.sh first when there is no .venv),
#   2. run the test suite with the GPU as MLX's default device,
#   3. selfextend selftest (what backend="auto" runs for each dtype and head size),
#   4. selfextend bench for SmolLM2 and a random 4-bit model of Llama-3-8B's attention shape
#      at 8k and 32k: prefill and decode tok/s, peak memory, SelfExtend/plain ratios,
#   5. write everything, and summary.md, under OUT.
#
#   scripts/gpu_check.sh [--dry-run] [OUT]        (OUT: docs/results/gpu-YYYY-MM-DD)
#
# --dry-run runs the same steps on this machine's CPU with small sizes and no install (the
# routing tests, selftest at 1k keys, bench at 1k/2k, one Llama-3-8B layer), to check the
# script and its Python pieces where there is no GPU. Environment: LLAMA_LAYERS (default 8),
# LENGTHS (default 8k,32k), DECODE_STEPS (default 16), REPEATS (prefill runs per mode, the
# best kept; default 2: the first also warms up the GPU), TEST_TIMEOUT (seconds, default 1800).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/docs/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

if ((DRY_RUN)); then
    LLAMA_LAYERS="${LLAMA_LAYERS:-1}"
    LENGTHS="${LENGTHS:-1k,2k}"
    DECODE_STEPS="${DECODE_STEPS:-2}"
    REPEATS="${REPEATS:-1}"
    WINDOW=(-W 256)  # below the shortest length, which bench requires
    SELFTEST_KEYS=1k
    TESTS=(tests/test_routing.py tests/test_kernel_guard.py tests/test_selftest_routes.py tests/test_gpu_check.py)
else
    LLAMA_LAYERS="${LLAMA_LAYERS:-8}"
    LENGTHS="${LENGTHS:-8k,32k}"
    DECODE_STEPS="${DECODE_STEPS:-16}"
    REPEATS="${REPEATS:-2}"
    WINDOW=()  # the registry's W (SmolLM2: 1024) or the window rule (the random model: 2048)
    SELFTEST_KEYS=8k
    TESTS=()
fi
TEST_TIMEOUT="${TEST_TIMEOUT:-1800}"

step() { printf '\n== %s\n' "$*" >&2; }
log() { printf '%s\n' "$*" >>"$OUT/commands.txt"; }
: >"$OUT/commands.txt"
log "scripts/gpu_check.sh $( ((DRY_RUN)) && echo --dry-run) $OUT  ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"

step "environment"
if [[ ! -x .venv/bin/python ]]; then
    log "./setup.sh"
    ./setup.sh
fi
PY="$ROOT/.venv/bin/python"
SELFEXTEND="$ROOT/.venv/bin/selfextend"
if ((!DRY_RUN)); then
    log "$PY -m pip install 'mlx[cuda]>=0.32,<0.33'"
    if ! "$PY" -m pip install --quiet "mlx[cuda]>=0.32,<0.33" >"$OUT/install.txt" 2>&1; then
        tail -5 "$OUT/install.txt" >&2
        echo "error: could not install mlx[cuda] (see $OUT/install.txt)" >&2
        exit 1
    fi
fi

step "device"
"$PY" - "$DRY_RUN" >"$OUT/device.json" <<'EOF'
import json, platform, sys
import mlx.core as mx
import mlx_lm
from selfextend_mlx.core.attention import device_kind

dry_run = sys.argv[1] == "1"
cuda = getattr(mx, "cuda", None)
info = {
    "device": str(mx.default_device()),
    "kind": device_kind(),
    "cuda": bool(cuda is not None and cuda.is_available()),
    "mlx": mx.__version__,
    "mlx_lm": mlx_lm.__version__,
    "python": platform.python_version(),
    "machine": platform.platform(),
    "dry_run": dry_run,
}
try:
    info.update({f"device_{k}": v for k, v in mx.device_info().items()})
except Exception as e:  # older MLX: no device_info
    info["device_info"] = f"unavailable ({type(e).__name__})"
print(json.dumps(info, indent=1))
if not dry_run and info["kind"] != "cuda":
    sys.exit("error: MLX's default device is not a CUDA GPU here: " + info["device"])
EOF
cat "$OUT/device.json" >&2

step "tests"
log "timeout $TEST_TIMEOUT $PY -m pytest -q ${TESTS[*]:-}"
set +e
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$OUT/tests.txt" 2>&1
TESTS_RC=$?
set -e
tail -3 "$OUT/tests.txt" >&2
echo "pytest exit code $TESTS_RC" >>"$OUT/tests.txt"

step "selftest"
log "$SELFEXTEND selftest --keys $SELFTEST_KEYS --json"
set +e
"$SELFEXTEND" selftest --keys "$SELFTEST_KEYS" --json >"$OUT/selftest.json" 2>"$OUT/selftest.err"
SELFTEST_RC=$?
set -e
cat "$OUT/selftest.err" >&2

step "models"
LLAMA="$OUT/llama3-8b-shape-4bit"
log "$PY scripts/gpu_check_model.py $LLAMA --layers $LLAMA_LAYERS"
"$PY" scripts/gpu_check_model.py "$LLAMA" --layers "$LLAMA_LAYERS"

bench() {  # NAME MODEL...: bench_NAME.json, or bench_NAME.err with what went wrong
    local name="$1"
    shift
    local args=(bench "$@" -l "$LENGTHS" --modes plain,selfextend --decode-steps "$DECODE_STEPS" --repeats "$REPEATS"
        "${WINDOW[@]}" --json)
    log "$SELFEXTEND ${args[*]}"
    step "bench $name ($LENGTHS)"
    if ! "$SELFEXTEND" "${args[@]}" >"$OUT/bench_$name.json" 2>"$OUT/bench_$name.err"; then
        cat "$OUT/bench_$name.err" >&2
        BENCH_FAILED=1
    fi
}
BENCH_FAILED=0
bench smollm2                          # the embedded default (no -m)
bench llama3-8b-shape-4bit -m "$LLAMA"
rm -rf "$LLAMA"  # 4-bit weights: not results

step "summary"
"$PY" scripts/gpu_check_report.py "$OUT" >/dev/null
echo "wrote $OUT/summary.md (tests exit $TESTS_RC, selftest exit $SELFTEST_RC, bench $([[ $BENCH_FAILED == 0 ]] && echo ok || echo FAILED))" >&2
[[ $TESTS_RC == 0 && $SELFTEST_RC == 0 && $BENCH_FAILED == 0 ]]
