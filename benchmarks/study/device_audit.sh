#!/usr/bin/env bash
# The baseline audit's runs (benchmarks/study/audit.py) as ONE device command, all at once on the GPU
# (they are small and launch-bound; carry .whl, .devbuild and the corpus: .cache/study for the stdlib
# shards of the committed study runs, or .cache/corpus with DATA=pk):
#
#     bash benchmarks/study/device_audit.sh "s:reference:plain:0 s:reference:block:0 s:project:plain:0 ..." [TOTAL_S]
#
# Each spec is model:arch:residual:seed[:ARGS] (ARGS: more audit.py arguments, comma-separated, e.g.
# s:reference:block:0:--init,gpt2,--tag,gpt2init; see audit_run in device_common.sh). Every run is cut
# at TOTAL_S (default 240) less the set-up (a cut run keeps its validations so far, status "cut", in its
# JSON); the JSONs and the logs come back in $OUT/audit.tgz.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../device_common.sh"
SPECS=${1:?usage: device_audit.sh "model:arch:residual:seed ..." [TOTAL_S]}
TOTAL=${2:-240}
T0=$(date +%s)
seed_triton_cache
install_wheels
unpack_xz_shards
fresh=0
extension_carried_or_wheel || echo "WARNING: the build failed; the depth-attention ops run the PyTorch reference path"
export AUDIT_DATA=${DATA:-}
mkdir -p benchmarks/results/audit
budget=$(( TOTAL - ($(date +%s) - T0) - 10 ))
echo "=== audit runs: $SPECS; $budget s"
for spec in $SPECS; do
  audit_run "$spec" "$budget" &
done
wait
grep -h "final val\|CUT\|Error\|error:" "$OUT"/logs/audit_*.log | tail -20
nvidia-smi --query-gpu=name --format=csv,noheader
tar czf "$OUT/audit.tgz" benchmarks/results/audit -C "$OUT" logs && rm -rf "$OUT/logs"
echo "done in $(( $(date +%s) - T0 )) s"
