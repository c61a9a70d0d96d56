#!/usr/bin/env bash
# The GPU checks in one run: the test suite, then the estimator benchmark on the device.
#
#   bash benchmarks/gpu_check.sh                 # on a machine whose python3 has a CUDA torch
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh    # also copy the logs and results to /tmp/gpu
#
# Environment:
#   PYTHON       the interpreter (default python3); its torch must see the device
#   DEVICE       torch device type (default cuda)
#   WHEELS       a folder of wheels to install first without an index (for machines that cannot
#                reach PyPI: pot, geomloss, diffusers, importlib_metadata are what the tests need
#                beyond a PyTorch image)
#   PYTEST_ARGS  extra pytest arguments (e.g. "-k wasserstein")
#   QUICK=1      tiny benchmark sizes, written under OUT (or /tmp), not to docs/results
#
# Order: the exact solvers' kernel tests and a focused benchmark (16384x8x64, masked and not)
# first, written under OUT (or /tmp), then the whole test suite and the full benchmark.
# Writes docs/results/estimators_$DEVICE.{json,md} (commit them); exits non-zero if the tests or
# the benchmark failed, 2 if the device is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-}
LOGS=${OUT:-/tmp}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl || exit 1
fi
"$PY" - "$DEVICE" <<'EOF' || exit 2
import sys

import torch

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
name = torch.cuda.get_device_name() if device == "cuda" else device
print(f"torch {torch.__version__} on {name}", flush=True)
EOF

status=0
# First what matters most, in case the device time runs out: the exact solvers' tests on the
# device (the fused kernel of solver="triton" has never run on a GPU) and their timing on the
# 16384x8x64 workload, masked and unmasked (the <= 4 ms target).
"$PY" -m pytest -q -p no:cacheprovider -x tests/test_triton_solver.py 2>&1 \
    | tee "$LOGS/gpu_check_triton_tests.log" || status=1
focus=(benchmarks/estimators.py --device "$DEVICE" --repeats 3 --configs 16384x8x64m,16384x8x64
       --skip geomloss "POT ot.batch" --out "$LOGS/estimators_${DEVICE}_focus")
if [ "${QUICK:-0}" = 1 ]; then
    focus=(benchmarks/estimators.py --device "$DEVICE" --quick --out "$LOGS/estimators_focus")
fi
"$PY" "${focus[@]}" 2>&1 | tee "$LOGS/gpu_check_focus.log" || status=1

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
"$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests ctxpred 2>&1 \
    | tee "$LOGS/gpu_check_tests.log" || status=1

bench=(benchmarks/estimators.py --device "$DEVICE" --repeats 3)
if [ "${QUICK:-0}" = 1 ]; then
    bench+=(--quick --out "$LOGS/estimators_quick")
fi
"$PY" "${bench[@]}" 2>&1 | tee "$LOGS/gpu_check_bench.log" || status=1
if [ -n "$OUT" ] && [ "${QUICK:-0}" != 1 ]; then
    cp "docs/results/estimators_$DEVICE.json" "docs/results/estimators_$DEVICE.md" "$OUT"/ \
        || status=1
fi
echo "gpu_check: exit $status"
exit $status
