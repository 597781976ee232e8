#!/usr/bin/env bash
# GPU check: the one script a person runs on a CUDA machine (no network needed, nothing downloaded).
#
#   bash bench/gpu_check.sh            # or: make gpu-check
#
# 1. installs this checkout into the current python (pip --no-deps, editable; falls back to a
#    PYTHONPATH of symlinks if pip cannot), 2. builds the compiled CUDA backend when
#    scanlib/build.py exists (a failure is reported, the rest goes on), 3. runs the GPU tests
#    (pytest -m gpu), 4. runs bench/scan_gpu.py, 5. bench/model_gpu.py (VMamba-T vs Swin-T),
#    6. the shared property suite for the GPU backends, and prints a short summary and the
#    benchmark tables LAST.
# Logs and results go to $OUT (when set, e.g. by a remote runner) or /tmp/scanlib_gpu_check.
# Time limits per step (seconds) can be changed: BUILD_S, TESTS_S, PROPERTY_S, BENCH_S,
# MODEL_BENCH_S; the benchmark itself stops measuring after BENCH_BUDGET_S. TOTAL_S (default 560)
# caps the whole run: a step gets at most what is left of it (less 15 s for the summary) and is
# skipped when under 30 s are left, so a remote call with a time limit still ends with the
# summary. STEPS picks steps (names as in the summary, e.g. STEPS="install model-bench" for a
# second call that only measures the models); PYTHON picks the interpreter.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-${TMPDIR:-/tmp}/scanlib_gpu_check}"
mkdir -p "$OUT_DIR"
BUILD_S="${BUILD_S:-360}"
TESTS_S="${TESTS_S:-200}"
PROPERTY_S="${PROPERTY_S:-240}"
BENCH_S="${BENCH_S:-240}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-180}"
MODEL_BENCH_S="${MODEL_BENCH_S:-200}"
# the GPU suite never uses Triton's CPU interpreter
unset TRITON_INTERPRET
TOTAL_S="${TOTAL_S:-560}"
STEPS="${STEPS:-install build-cuda gpu-tests bench model-bench property-gpu}"
T_START=$(date +%s)
SUMMARY=()

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc left
    if ! wanted "$name"; then
        SUMMARY+=("| $name | not in STEPS | | |")
        return 0
    fi
    left=$((TOTAL_S - 15 - ($(date +%s) - T_START)))
    if [ "$left" -lt 30 ]; then
        SUMMARY+=("| $name | SKIPPED: ${left}s left of TOTAL_S=${TOTAL_S} | | |")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=20 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    local tail_line
    tail_line=$(grep -E "passed|failed|error|skipped|no tests ran" "$OUT_DIR/$name.log" | tail -n 1 | cut -c1-110)
    if [ $rc -eq 0 ]; then
        SUMMARY+=("| $name | ok | ${dt}s | ${tail_line} |")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("| $name | TIMED OUT | ${dt}s | ${tail_line} |")
    else
        SUMMARY+=("| $name | FAILED (rc=$rc) | ${dt}s | ${tail_line} |")
    fi
    tail -n 25 "$OUT_DIR/$name.log"
    return $rc
}

echo "=== machine"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
    "$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for m in ("triton", "cupy", "numba"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
EOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
} 2>&1 | tee "$OUT_DIR/machine.log"

# 1. install (no dependencies, no network); check that the packages import
step install 300 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
if ! "$PY" -c "import scanlib, scanlib_backends.torch" >/dev/null 2>&1; then
    echo "the installed packages do not import: using a PYTHONPATH of symlinks instead"
    PKG_DIR="$OUT_DIR/pkgs"
    mkdir -p "$PKG_DIR"
    ln -sfn "$PWD/scanlib" "$PKG_DIR/scanlib"
    ln -sfn "$PWD/backends" "$PKG_DIR/scanlib_backends"
    ln -sfn "$PWD/csrc" "$PKG_DIR/scanlib_csrc"
    [ -d vmamba ] && ln -sfn "$PWD/vmamba" "$PKG_DIR/vmamba"
    export PYTHONPATH="$PKG_DIR${PYTHONPATH:+:$PYTHONPATH}"
    SUMMARY+=("| import | via PYTHONPATH symlinks | | $PKG_DIR |")
fi

# 2. the compiled CUDA backend, when this checkout has it
if [ -f scanlib/build.py ]; then
    step build-cuda "$BUILD_S" "$PY" -m scanlib.build
else
    SUMMARY+=("| build-cuda | absent | | scanlib/build.py not in this checkout |")
fi

# a benchmark's own budget: its default, or less when the run's time is short (it must print)
budget() {
    local want=$1 left
    left=$((TOTAL_S - 15 - ($(date +%s) - T_START) - 45))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 20 ] && want=20
    echo "$want"
}

# 3. GPU tests (the gpu-marked tests: backends on CUDA, the compiled extension, the models)
step gpu-tests "$TESTS_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/

# 4. the scan benchmark (ratios against the reference and the peers)
step bench "$BENCH_S" "$PY" bench/scan_gpu.py --budget "$(budget "$BENCH_BUDGET_S")" \
    --table "$OUT_DIR/scan_gpu.md" --json "$OUT_DIR/scan_gpu.json"

# 5. end to end: VMamba-T vs Swin-T at batch 128 (fp32 and bf16 forward, bf16 training step)
step model-bench "$MODEL_BENCH_S" "$PY" bench/model_gpu.py --budget "$(budget 150)" \
    --table "$OUT_DIR/model_gpu.md" --json "$OUT_DIR/model_gpu.json"

# 6. the shared property suite for the GPU backends at full strength (torch/numba run on CPU in
# make test); last, with what is left of TOTAL_S: a second call with STEPS="install property-gpu"
# finishes it
step property-gpu "$PROPERTY_S" "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    tests/test_backends_property.py -k "triton or cupy or (cuda and not emulation)"

echo
echo "=== summary ($(($(date +%s) - T_START)) s; logs in $OUT_DIR)"
echo "| step | result | time | last line |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
if [ -s "$OUT_DIR/scan_gpu.md" ]; then
    cat "$OUT_DIR/scan_gpu.md"
else
    echo "(no benchmark table: see $OUT_DIR/bench.log)"
fi
if [ -s "$OUT_DIR/model_gpu.md" ]; then
    echo
    cat "$OUT_DIR/model_gpu.md"
fi
