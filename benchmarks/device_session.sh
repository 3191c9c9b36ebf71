#!/usr/bin/env bash
# One call on a lent GPU machine (no network there): carried wheels, the CUDA build, the GPU tests.
#
#     bash benchmarks/device_session.sh [TESTS_TIMEOUT_S]        (carry .whl; default 420 s for the tests)
#
# .whl/ (git-ignored) holds pure-Python wheels the image lacks: jsonargparse, docstring-parser,
# typeshed-client, importlib_resources, fla-core, flash-attn-res (README "Benchmarks" says how to fetch).
# Logs go to $OUT: build.log, info.txt, gpu_tests.log (with per-test durations).
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
timeout "$TESTS_TIMEOUT" python3 -m pytest -v -rs --durations=20 tests/test_ops_cuda.py tests/gpu \
  >"$OUT/gpu_tests.log" 2>&1
echo "tests: exit $? after $(( $(date +%s) - T0 )) s (124: timed out; see gpu_tests.log)"
grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | sed 's/ *\[.*//' | sort | uniq -c | sort -rn | head -5
tail -30 "$OUT/gpu_tests.log"
