#!/usr/bin/env bash
# Two builds of the extension side by side on one GPU, as ONE device command: the checkout's own (the
# "new" build) against an older checkout in .old/ with its build in .devbuild_old/ (the "base"). Carry
# .whl, .old, .devbuild_old, and .devbuild when a previous call built this csrc/.
#
#     bash benchmarks/device_ab.sh [ROUNDS] [E2E_SHAPES]
#
# Make the base: `git archive REV | tar -x -C .old` and its build (a previous call's _C.abi3.so.xz,
# _build_info.json) in .devbuild_old/. Steps, all within AB_TOTAL_S (default 560 s):
#   1. the new build (carried or built, see device_common.sh), then the CUDA op tests (AB_TESTS=0 skips);
#   2. the CUDA op grid (AB_QUICK=1: the quick N = 16384 sweep, ~1 min a round on an H100; else the full
#      grid, over 2 min), ROUNDS (default 2) rounds alternating base and new, each in its own process;
#      the table of new/base per shape and op (median of the rounds), JSON in $OUT/ab/;
#   3. E2E_SHAPES given (e.g. '[small]'): `bench e2e` training rows, standard and Block, base then new
#      (AB_MODES default '[standard,block]', AB_VARIANTS default '[eager]'; AB_BATCH: the bench's --batch;
#      AB_PROFILE: its --profile, default true; `kernels` for large shapes such as medium);
#      AB_E2E_SIDES: "new" (or "base") runs one side's rows only, e.g. compiled rows whose base is known;
#      a side whose budget is under AB_COMPILE_MIN_S (default 140 s) with a compiled variant is skipped;
#      AB_OPS_NEW=1: before step 2, the new build's quick op grid alone (its rows side by side: fused
#      ops against the separate ones), JSON $OUT/ab/ops_new.json;
#      AB_TESTS (step 1): 0 none, 1 (default) the CUDA op tests, else the GPU tests to run, groups of pytest
#      arguments separated by ';' as device_presets.sh's PRESETS_TESTS). ROUNDS 0 skips step 2: an A/B of
#      Python changes only (copy .devbuild to .devbuild_old when csrc/ is the same). With profiles, each
#      mode and variant's kernels side by side (benchmarks/profile_diff.py; $OUT/ab/profile_diff_*).
# $OUT/ab.tgz holds the JSON of every round.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"
ROUNDS=${1:-2}
E2E=${2:-}
TOTAL=${AB_TOTAL_S:-560}
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
need_base=1; [[ ${ROUNDS} == 0 && ( -z $E2E || ${AB_E2E_SIDES:-base new} != *base* ) ]] && need_base=0
[[ $need_base == 0 || ( -d .old/attnres && -f .devbuild_old/_C.abi3.so.xz ) ]] \
  || { echo "no base: .old/ and .devbuild_old/ are needed"; exit 2; }
install_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
seed_triton_cache  # (also sets TRITON_CACHE_DIR)
fresh=0
extension_carried_or_wheel || exit 1
if [[ $need_base == 1 ]]; then
  xz -dc .devbuild_old/_C.abi3.so.xz >.old/attnres/_C.abi3.so && cp .devbuild_old/_build_info.json .old/attnres/
  (cd .old && python3 -c "from attnres import ops; print('base: depth ops on cuda:', ops.backend('cuda'))")
fi
python3 -c "from attnres import ops; print('new:  depth ops on cuda:', ops.backend('cuda'))"
if [[ "${AB_TESTS:-1}" != 0 && "${AB_TESTS:-1}" != 1 ]]; then
  gpu_tests "${AB_TEST_S:-200}" 90 "$AB_TESTS"  # groups of pytest arguments separated by ';'
elif [[ "${AB_TESTS:-1}" != 0 ]]; then
  timeout "${AB_TEST_S:-200}" python3 -m pytest -q -p no:logging -rfE tests/test_ops_cuda.py >"$OUT/tests_ops_cuda.log" 2>&1
  echo "CUDA op tests: exit $? ($(tail -1 "$OUT/tests_ops_cuda.log"))"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_ops_cuda.log" | head -20
fi
mkdir -p "$OUT/ab"
# $OUT returns at most 8 files: everything of the A/B goes back as one archive, also when time runs out
trap '(cd "$OUT" && tar czf ab.tgz ab && rm -rf ab)' EXIT
if [[ "${AB_OPS_NEW:-0}" != 0 ]]; then  # the new build's quick op grid alone (its own side-by-side rows)
  timeout 150 python3 -m lightning_modules bench ops --device cuda --quick true --compare none \
    --out "$OUT/ab/ops_new.json" >"$OUT/ab/ops_new.log" 2>&1 || echo "ops (new build): exit $?"
  grep -E "^N=" "$OUT/ab/ops_new.log" | head -30
fi
quick=false; [[ "${AB_QUICK:-0}" != 0 ]] && quick=true
# the base's application: `python -m lightning_modules` since the restructure (issue 26), before it
# `python -m attnres`
base_app=attnres; [[ -f .old/lightning_modules/__main__.py ]] && base_app=lightning_modules
cap() { local t=$(( $(left) - 20 )); echo $(( t < $1 ? t : $1 )); }
for r in $(seq 1 "$ROUNDS"); do
  (( $(left) > 120 )) || { echo "round $r: out of time"; break; }
  (cd .old && timeout "$(cap 200)" python3 -m $base_app bench ops --device cuda --quick $quick --compare none --out "$OUT/ab/base_$r.json" \
    >"$OUT/ab/base_$r.log" 2>&1) || echo "base round $r: exit $?"
  timeout "$(cap 200)" python3 -m lightning_modules bench ops --device cuda --quick $quick --compare none --out "$OUT/ab/new_$r.json" \
    >"$OUT/ab/new_$r.log" 2>&1 || echo "new round $r: exit $?"
  echo "round $r done after $(( $(date +%s) - T0 )) s"
done
(( ROUNDS > 0 )) && python3 - "$OUT/ab" <<'PY' | tee "$OUT/ab/compare.txt" | tail -60
import glob, json, sys
from attnres.bench.report import compare_ops_runs
d = sys.argv[1]
res = compare_ops_runs(sorted(glob.glob(f"{d}/base_*.json")), sorted(glob.glob(f"{d}/new_*.json")))
json.dump(res, open(f"{d}/compare.json", "w"), indent=1)
PY
if [[ -n "$E2E" ]]; then
  sides=${AB_E2E_SIDES:-base new}
  for side in $sides; do
    div=1; [[ $side == base && $sides == *new* ]] && div=2
    budget=$(( ($(left) - 30) / div ))
    # a compiled row's first step alone takes 80-95 s at `medium` on an H100 (session 27: a 95 s budget
    # was cut inside it, no row written)
    need=60; [[ ${AB_VARIANTS:-eager} =~ compile|nested|regional|reduce ]] && need=${AB_COMPILE_MIN_S:-140}
    (( budget > need )) || { echo "e2e $side: out of time ($budget s left, a row needs $need)"; continue; }
    dir=.; [[ $side == base ]] && dir=.old
    mod=lightning_modules; [[ $side == base ]] && mod=$base_app
    (cd $dir && timeout --signal=INT --kill-after=10 $(( budget + 20 )) python3 -m $mod bench e2e --tag "ab_$side" \
      --budget_s "$budget" --shapes "$E2E" --modes "${AB_MODES:-[standard,block]}" --kinds '[train]' \
      --variants "${AB_VARIANTS:-[eager]}" ${AB_BATCH:+--batch "$AB_BATCH"} --profile "${AB_PROFILE:-true}" \
      --impls '[attnres]' --out "$OUT/ab/e2e_$side.json" >"$OUT/ab/e2e_$side.log" 2>&1) || echo "e2e $side: exit $?"
    grep -E "train|step" "$OUT/ab/e2e_$side.log" | grep -v DEBUG | tail -6
  done
  # the profiles side by side, kernel by kernel (benchmarks/profile_diff.py), per mode and variant
  if [[ "${AB_PROFILE:-true}" != false && -f "$OUT/ab/e2e_base.json" && -f "$OUT/ab/e2e_new.json" ]]; then
    for mode in $(tr -d '[] ' <<<"${AB_MODES:-[standard,block]}" | tr ',' ' '); do
      for variant in $(tr -d '[] ' <<<"${AB_VARIANTS:-[eager]}" | tr ',' ' '); do
        python3 -m benchmarks.profile_diff "$OUT/ab/e2e_base.json" "$OUT/ab/e2e_new.json" --mode "$mode" \
          --variant "$variant" --top 12 --out "$OUT/ab/profile_diff_${mode}_$variant.json" 2>&1 \
          | tee "$OUT/ab/profile_diff_${mode}_$variant.txt" | head -32
      done
    done
  fi
fi
echo "done in $(( $(date +%s) - T0 )) s"
