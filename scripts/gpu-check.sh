#!/usr/bin/env bash
# gpu-check.sh -- everything a GPU must show about this project, in one call (issue 28).
#
#   scripts/gpu-check.sh [--device cuda|cpu] [--quick] [--no-install] OUTDIR
#
# Phases, each timed (one "phase NAME: ..." line) and stopped when it overruns its budget:
#   install  the README's install: the CUDA build of the pinned torch unless torch already sees a
#            GPU, then `pip install -e ".[test]"` (fairseq, ONNX Runtime, pytest, CTranslate2)
#   env      torch, CUDA and the GPU's name; --device cuda stops here without a GPU
#   tests    pytest -m cuda: both shipped pairs in fp16/bf16 on CUDA, exact mode against the big
#            model's greedy output with near ties counted, the runner on two shards
#   bench    bild-jobs bench on both shipped pairs (benchmarks/suites-gpu.json), in fp16 on a GPU,
#            at batch 1, 16 and 64, with the CTranslate2 rows and the serial memory pass
# Every log and result goes to OUTDIR; the exit status is 1 when any phase failed or overran.
# Budget: under 9 minutes on one H100-class GPU, install included (per-phase budgets below:
# chosen, not yet measured on a GPU). --device cpu --quick (bf16, 1 line per pair, no memory
# pass) runs end to end on a CPU in CI, so the script is not broken when a GPU finally appears;
# --no-install skips the install where the project is installed already. PYTHON [python3];
# GPU_CHECK_BUDGET_{INSTALL,ENV,TESTS,BENCH}: a phase's budget in seconds.
set -uo pipefail

DEVICE=cuda QUICK=0 INSTALL=1 OUT=
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:-}; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;  # the header comment
        -*) echo "gpu-check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu-check.sh: one OUTDIR, got $OUT and $1" >&2; exit 2; }; OUT=$1; shift ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu-check.sh: give OUTDIR, where the logs and results go (see --help)" >&2; exit 2; }
case $DEVICE in
    cuda) PRECISION=fp16 ;;
    cpu) PRECISION=bf16 ;;  # fp16 is refused on the CPU
    *) echo "gpu-check.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
if [ "$QUICK" = 1 ]; then
    LIMIT=(--limit 1) MEMORY=--no-memory BUDGETS=(300 60 120 240)
else
    LIMIT=() MEMORY=--memory BUDGETS=(150 20 100 250)  # the suites' own limits: 100 deen lines, 30 summ documents
fi
# seconds per phase; GPU_CHECK_BUDGET_<PHASE> overrides one (a slower GPU than an H100 needs more)
BUDGET_INSTALL=${GPU_CHECK_BUDGET_INSTALL:-${BUDGETS[0]}} BUDGET_ENV=${GPU_CHECK_BUDGET_ENV:-${BUDGETS[1]}}
BUDGET_TESTS=${GPU_CHECK_BUDGET_TESTS:-${BUDGETS[2]}} BUDGET_BENCH=${GPU_CHECK_BUDGET_BENCH:-${BUDGETS[3]}}
FAILED=0
: > "$OUT/timings.txt"

# phase NAME BUDGET_S COMMAND...: run COMMAND with its output in OUT/NAME.log, stopped after
# BUDGET_S seconds; print and record one timing line
phase() {
    local name=$1 budget=$2 start status verdict
    shift 2
    start=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    case $status in
        0) verdict=ok ;;
        124|137) verdict="OVERRAN its ${budget} s budget, stopped"; FAILED=1 ;;
        *) verdict="FAILED (exit $status), see $OUT/$name.log"; FAILED=1 ;;
    esac
    echo "phase $name: $verdict in $(( $(date +%s) - start )) s" | tee -a "$OUT/timings.txt"
    return "$status"
}

install() {
    if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        local pin
        pin=$(grep -o '"torch==[0-9.]*"' setup.py | tr -d '"')
        "$PYTHON" -m pip install "$pin" --index-url https://download.pytorch.org/whl/cu128 || return
    fi
    "$PYTHON" -m pip install -e ".[test]"
}

environment() {
    "$PYTHON" - "$DEVICE" <<'EOF'
import sys

import ctranslate2
import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
print(f"CTranslate2 {ctranslate2.__version__}, CUDA devices: {ctranslate2.get_cuda_device_count()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
elif sys.argv[1] == "cuda":
    sys.exit("gpu-check.sh: --device cuda, but torch sees no GPU here: run on a CUDA machine, or --device cpu")
EOF
}

export -f install environment
export DEVICE PYTHON
START=$(date +%s)
if [ "$INSTALL" = 1 ]; then
    phase install "$BUDGET_INSTALL" bash -c install || { echo "gpu-check.sh: install failed, stopping" >&2; exit 1; }
fi
phase env "$BUDGET_ENV" bash -c environment || { tail -n 1 "$OUT/env.log" >&2; exit 1; }
cat "$OUT/env.log"
phase tests "$BUDGET_TESTS" "$PYTHON" -m pytest -n 0 -m cuda -v -s -rs tests/test_cuda.py --junitxml "$OUT/tests.xml"
phase bench "$BUDGET_BENCH" "$PYTHON" -m jobs.tuning.bench benchmarks/suites-gpu.json --out "$OUT/bench" \
    --device "$DEVICE" --precision "$PRECISION" --batch 1 --batch 16 --batch 64 --engine torch \
    --repeats 1 "${LIMIT[@]}" "$MEMORY"
echo "total: $(( $(date +%s) - START )) s; results in $OUT" | tee -a "$OUT/timings.txt"
exit "$FAILED"
