#!/usr/bin/env bash
# The depth-attention kernels on a lent GPU, as ONE device command (carry .whl): the CUDA build,
# the CUDA op tests, then `attnres bench ops` (the quick grid plus EXTRA shapes, baselines on
# COMPARE shapes).
#
#     bash benchmarks/device_ops.sh [TOTAL_S]          (default 540 s for everything)
#
# Environment: OPS_EXTRA="N,d,n,S;..." (default: the Block AttnRes shapes of the e2e dense model,
# 8192 tokens x 2048, 4 queries), OPS_COMPARE="N,d,n,S;..." (default none: the baselines compile
# for minutes per shape), OPS_TESTS=0 to skip the tests, OPS_GRID=0 to time only the EXTRA shapes (not
# the quick grid). Logs and JSON go to $OUT.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"  # $OUT, unbuffered output
TOTAL=${1:-540}
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
install_wheels
export TRITON_CACHE_DIR="$PWD/.cache/triton"
build_extension 300 >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
echo "build done after $(( $(date +%s) - T0 )) s"
python3 -m attnres info > "$OUT/info.txt" 2>&1
if [[ "${OPS_TESTS:-1}" != 0 ]]; then
  timeout $(( $(left) / 2 )) python3 -m pytest -q -rs --durations=10 tests/test_ops_cuda.py >"$OUT/ops_tests.log" 2>&1
  echo "tests: exit $? after $(( $(date +%s) - T0 )) s"
  grep -E "passed|failed|FAILED|Error" "$OUT/ops_tests.log" | tail -15
fi
slug=$(python3 -c "import torch; from attnres.bench.timing import device_slug; print(device_slug(torch.device('cuda')))")
timeout $(( $(left) - 15 )) python3 - "$OUT/ops_cuda_${slug}.json" <<'PY' 2>&1 | tee "$OUT/ops_bench.log" | tail -80
import os, sys
from attnres.bench import ops as b
extra = b.parse_shapes(os.environ.get("OPS_EXTRA", "8192,2048,2,4;8192,2048,5,4;8192,2048,8,4;8192,2048,9,2")) or []
compare = b.parse_shapes(os.environ.get("OPS_COMPARE", "none"))
grid = b.cuda_grid(quick=True) if os.environ.get("OPS_GRID", "1") != "0" else []
b.run_ops_benchmark("cuda", shapes=extra + grid, compare=compare, out=sys.argv[1])
PY
cp "$OUT"/ops_cuda_*.json benchmarks/results/ 2>/dev/null
# OPS_NCU="N,d,n,S": Nsight Compute metrics of every kernel of the ops on that shape (bf16)
if [[ -n "${OPS_NCU:-}" ]] && command -v ncu >/dev/null && (( $(left) > 60 )); then
  IFS=, read -r nN nd nn nS <<<"$OPS_NCU"
  m=dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
  m=$m,gpu__time_duration.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,launch__block_size
  m=$m,launch__grid_size,launch__registers_per_thread,lts__throughput.avg.pct_of_peak_sustained_elapsed
  m=$m,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active
  m=$m,smsp__issue_active.avg.pct_of_peak_sustained_active
  timeout $(( $(left) - 10 )) ncu --clock-control none --kernel-name regex:'p1_|p2_' --launch-skip 5 \
    --launch-count 5 --metrics "$m" python3 benchmarks/ncu_ops_cuda.py --N "$nN" --d "$nd" --n "$nn" --S "$nS" \
    >"$OUT/ncu.log" 2>&1
  echo "ncu: exit $?"; grep -E "^  [a-z].*\(|time_duration|dram__throughput|issue_active|warps_active" "$OUT/ncu.log"
fi
echo "done after $(( $(date +%s) - T0 )) s"
