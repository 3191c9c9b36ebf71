#!/usr/bin/env bash
# The end-to-end benchmark on a lent GPU, as ONE device command (carry .whl):
#
#     bash benchmarks/device_e2e.sh [PART]
#
# PART (each run is one process, so its ratios are measured side by side; rows run in priority order
# until the run's time budget is spent, the rest are recorded as skipped):
#   dense     dense shape, training: eager and compiled, ours and fla            (run "dense")
#   rest      prefill + decode on both shapes (run "serve"), the template vs a hand-written step
#             (run "template"), medium training eager then compiled (run "medium")
#   all       dense, then rest, in one call (what does not fit is skipped)
#   serve | template | medium | eager    one of those runs alone ("eager": training eager +
#             prefill/decode on both shapes, no compilation)
#   core      the targets' rows on the dense shape in ~8 minutes, three runs: training eager
#             (standard, Block, Full, Block with recompute, Block and Full unfused; then fla's Block
#             and Full if time is left), compiled training (standard, Block, Block unfused), prefill
#             and decode (standard, Block)
#
# Wheels in .whl/ (fla-core 0.6.0: the fla peer row and fla's KDA kernels; jsonargparse: the command
# line) are installed under /tmp/site. The extension is built unless a built one is newer than csrc/.
# Everything ends within E2E_TOTAL_S seconds (default 530). Each run's JSON is rewritten after every
# row; at the end the runs found in benchmarks/results/ are merged into e2e_<device>.json, and the
# JSON files and the log are copied to $OUT.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"
PART=${1:-dense}
TOTAL=${E2E_TOTAL_S:-530}
T0=$(date +%s)
case "$PART" in
  dense|rest|all|serve|template|medium|eager|core) ;;
  *) echo "unknown PART '$PART' (dense | rest | all | serve | template | medium | eager | core)"; exit 2 ;;
esac
export OUT=${OUT:-/tmp/e2e_out}
mkdir -p "$OUT" benchmarks/results
LOG="$OUT/e2e_${PART}.log"
export PYTHONUNBUFFERED=1
# compiled kernels stay in the working tree (ignored): a warm machine reuses them on the next call
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton"
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

# bench TAG BUDGET_S ARGS...: one run; it starts no row after BUDGET_S, timeout is the hard stop
bench() {
  local tag=$1 budget=$2; shift 2
  local hard=$(( budget + 60 < $(left) - 20 ? budget + 60 : $(left) - 20 ))
  if (( budget < 30 || hard < 30 )); then echo "=== run $tag: no time left"; return; fi
  echo "=== run $tag: budget $budget s, hard limit $hard s"
  timeout --signal=INT --kill-after=10 "$hard" \
    python3 -m lightning_modules bench e2e --tag "$tag" --budget_s "$budget" "$@"
  echo "=== run $tag: exit status $? (124: timed out; the JSON keeps every row finished before)"
}
run_dense()    { bench dense "$1" --shapes '[dense]' --kinds '[train]'; }
run_serve()    { bench serve "$1" --kinds '[prefill,decode]'; }
run_template() { bench template "$1" --shapes '[dense]' --kinds '[template]'; }
run_medium()   { bench medium "$1" --shapes '[medium]' --kinds '[train]'; }
run_core() {  # ~8 minutes: eager training, compiled training, then prefill/decode (each its own run)
  bench core_eager $(( $(left) * 40 / 100 )) --shapes '[dense]' --kinds '[train]' --variants '[eager]'
  bench core_compile $(( $(left) * 60 / 100 )) --shapes '[dense]' --modes '[standard,block]' \
    --kinds '[train]' --variants '[compile]' --impls '[attnres,attnres-unfused]'
  bench core_serve $(( $(left) - 30 )) --shapes '[dense]' --modes '[standard,block]' \
    --kinds '[prefill,decode]' --impls '[attnres]'
}
run_rest() {  # serve ~2 min, template ~3 min, medium the rest
  run_serve $(( $(left) * 25 / 100 ))
  run_template $(( $(left) * 45 / 100 ))
  run_medium $(( $(left) - 45 ))
}

main() {
  install_wheels
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c '
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for mod in ("fla.ops.attnres", "fla.ops.kda", "jsonargparse", "lightning", "lightning_modules.module"):
    try:
        importlib.import_module(mod)
        print("import", mod, "ok")
    except Exception as exc:
        print("import", mod, "FAILED:", type(exc).__name__, str(exc)[:200])
'
  build_extension 270 || echo "WARNING: the build failed; the depth-attention ops run the PyTorch reference path"
  python3 -c "from attnres import ops; print('depth ops on cuda:', ops.backend('cuda'), ops.extension_error or '')"

  case "$PART" in
    dense)    run_dense $(( $(left) - 45 )) ;;
    rest)     run_rest ;;
    all)      run_dense $(( $(left) * 55 / 100 )); run_rest ;;
    serve)    run_serve $(( $(left) - 45 )) ;;
    template) run_template $(( $(left) - 45 )) ;;
    medium)   run_medium $(( $(left) - 45 )) ;;
    core)     run_core ;;
    eager)    bench eager $(( $(left) - 45 )) --variants '[eager]' --kinds '[train,prefill,decode]' ;;
  esac

  python3 -c '
import glob, os, shutil
import torch
from attnres.bench.report import format_table, merge_results
from attnres.bench.timing import device_slug
slug = device_slug(torch.device("cuda"))
parts = sorted(p for p in glob.glob(f"benchmarks/results/e2e_{slug}_*.json") if not p.endswith("_quick.json"))
if not parts:
    print("no JSON written")
else:
    merged = f"benchmarks/results/e2e_{slug}.json"
    table = format_table(merge_results(parts, merged))
    for path in parts + [merged]:
        shutil.copy(path, os.environ["OUT"])
    print(f"merged {len(parts)} runs into {merged}; copied to $OUT:", *map(os.path.basename, parts))
    print(table)
'
  echo "done in $(( $(date +%s) - T0 )) s"
}

main 2>&1 | tee "$LOG"
