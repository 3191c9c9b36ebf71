#!/usr/bin/env bash
# One device call of the study (docs/study_plan.md), as ONE `run` command (carry .whl and .cache/study):
#
#     ATTNRES_COMMIT=<hash> bash benchmarks/study/device.sh SWEEP [RUN_IDS] [BUDGET_S]
#
# SWEEP: a sweep of configs/study/sweeps.yaml; RUN_IDS: comma-separated run ids (a slice; "" = all);
# BUDGET_S: seconds for the runs of this call (default 540 minus the set-up); STUDY_PARALLEL=K trains
# K runs at once on the one GPU (default 1); STUDY_START_ALL=1 starts runs that cannot finish in this
# call (the next call on the same warm machine resumes them); STUDY_MEMORY_GB=G lets the concurrent
# runs' memory_gb (configs/study/sweeps.yaml) add up to G GiB (default 97 % of the GPU). Installs the wheels of
# .whl/ under /tmp/site, unpacks xz-compressed shards (.cache/corpus), takes attnres._C from .devbuild/
# when carried for this csrc/ (else builds it and returns it in $OUT), runs the sweep with
# benchmarks/study/run.py (runs stop at the budget and resume from their checkpoint on the next call
# while the machine stays warm), then packs benchmarks/results/study/ and the logs into
# $OUT/study_<sweep>.tgz (one file: the device returns at most 8) and copies the console log, and
# Triton's autotune results into $OUT/triton_autotune.tgz (unpack into .cache/ and carry .cache/triton).
# STUDY_AUDIT="s:plain:0 s:block:0 ..." trains benchmarks/study/audit.py's reference runs
# (model:residual:seed[:extra,audit.py,arguments]), one after another, beside the sweep on the same GPU
# (12 GiB kept for them unless STUDY_MEMORY_GB is given); on the package corpus when .cache/corpus is
# carried (run ids end in -pk); their JSONs go into the same archive.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../device_common.sh"
SWEEP=${1:?usage: device.sh SWEEP [RUN_IDS] [BUDGET_S]}
RUNS=${2:-}
TOTAL=${3:-540}
T0=$(date +%s)
export OUT=${OUT:-/tmp/study_out}
export PYTHONUNBUFFERED=1
# several runs share the GPU (STUDY_PARALLEL): less fragmentation, so the plan's memory_gb holds
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT/logs" benchmarks/results/study
# fla's KDA kernels autotune once per shape (minutes on a fresh machine); Triton stores each result
# as *.autotune.json under its cache dir, .cache/triton (seed_triton_cache sets TRITON_CACHE_DIR). Carry
# it (only those files come back: the compiled kernels are ~190 MB) and the next machine skips the
# benchmarking; without a carried cache, start from the committed one; Triton ignores entries whose
# kernel or version changed
seed_triton_cache
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

# the audit's reference runs, one at a time, until the budget ends (a run cut by it keeps its validations
# so far in its JSON, status "cut")
audit_runs() {
  local spec model residual seed log
  [[ -f .cache/corpus/shards/meta.json ]] && export AUDIT_DATA=pk
  for spec in $STUDY_AUDIT; do
    IFS=: read -r model residual seed <<<"$spec"
    (( $(left) > 90 )) || { echo "=== audit $spec: not started, $(left) s left"; continue; }
    echo "=== audit $spec ($(left) s left)"
    # seed may carry audit.py's extra arguments (m:plain:0:--lr,0.003,--tag,pk-lr2): audit_run's log name
    log="$model:reference:$residual:$seed"; log=${log//:/_}
    audit_run "$model:reference:$residual:$seed" $(( $(left) - 30 ))
    echo "=== audit $spec exit $? ($(grep -h 'final val\|CUT' "$OUT/logs/audit_${log//,/_}.log" | tail -1))"
  done
}

main() {
  install_wheels
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,driver_version --format=csv
  unpack_xz_shards
  [[ -f .cache/study/shards/meta.json || -f .cache/corpus/shards/meta.json ]] \
    || { echo "ERROR: no corpus: carry .cache/study or .cache/corpus (docs/study_plan.md, Data)"; exit 2; }
  fresh=0
  extension_carried_or_wheel || echo "WARNING: the build failed; the depth-attention ops run the PyTorch reference path"
  python3 -m attnres info
  local budget=$(( $(left) - 25 ))
  echo "=== sweep $SWEEP ${RUNS:+(runs $RUNS) }budget $budget s"
  local audit_pid=""
  if [[ -n ${STUDY_AUDIT:-} ]]; then
    audit_runs & audit_pid=$!
    # the reference runs take ~5 GiB at s, ~10 at m: leave them 12 GiB of the sweep's share
    if [[ -z ${STUDY_MEMORY_GB:-} ]]; then
      STUDY_MEMORY_GB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 \
        | awk '{printf "%d", $1 / 1024 * 0.97 - 12}')
      echo "=== audit runs beside the sweep: the sweep's runs share $STUDY_MEMORY_GB GiB"
    fi
  fi
  timeout --signal=INT --kill-after=15 $(( budget + 20 )) python3 -m benchmarks.study.run --sweep "$SWEEP" --parallel "${STUDY_PARALLEL:-1}" ${STUDY_START_ALL:+--start_all} \
    ${STUDY_MEMORY_GB:+--memory_gb "$STUDY_MEMORY_GB"} \
    ${RUNS:+--runs "$RUNS"} --budget_s "$budget" --log_dir "$OUT/logs"
  echo "=== exit status $?"
  [[ -n $audit_pid ]] && wait "$audit_pid"
  python3 -m benchmarks.study.run --sweep "$SWEEP" --list
  echo "done in $(( $(date +%s) - T0 )) s"
}

main 2>&1 | tee "$OUT/console_${SWEEP//,/_}.log"
mkdir -p benchmarks/results/audit
tar czf "$OUT/study_${SWEEP//,/_}.tgz" benchmarks/results/study benchmarks/results/audit -C "$OUT" logs && rm -rf "$OUT/logs"
(cd .cache && find triton -name '*.autotune.json' -print0 | tar czf "$OUT/triton_autotune.tgz" --null -T -)
ls -la "$OUT"
