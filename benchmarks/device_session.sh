#!/usr/bin/env bash
# One call on a lent GPU machine (no network there): carried wheels, the CUDA build, the GPU tests.
#
#     bash benchmarks/device_session.sh [TESTS_TIMEOUT_S]        (carry .whl; default 420 s for the tests)
#
# .whl/ (git-ignored) holds pure-Python wheels the image lacks: jsonargparse, docstring-parser,
# typeshed-client, importlib_resources, fla-core, flash-attn-res (README "Benchmarks" says how to fetch).
# Logs go to $OUT: build.log, info.txt, tests_gpu.log (with each file's slowest tests).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"  # $OUT, unbuffered output
TESTS_TIMEOUT=${1:-420}
T0=$(date +%s)
install_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
build_extension 300 >"$OUT/build.log" 2>&1
rc=$?
echo "build: exit $rc after $(( $(date +%s) - T0 )) s"
if (( rc != 0 )); then tail -40 "$OUT/build.log"; exit "$rc"; fi
python3 -m attnres info | tee "$OUT/info.txt"
# one pytest process per file (gpu_tests in device_common.sh): a test stuck in a driver call loses only its file
seed_triton_cache
gpu_tests "$TESTS_TIMEOUT" 120 "tests/test_ops_cuda.py;$(ls tests/gpu/test_*.py | paste -sd';')"
echo "tests: $(( $(date +%s) - T0 )) s; the verbose log: tests_gpu.log"
