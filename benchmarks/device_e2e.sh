#!/usr/bin/env bash
# The end-to-end benchmark on a lent GPU, as ONE device command (carry .whl):
#
#     bash benchmarks/device_e2e.sh [PART]
#
# PART (default all):
#   all       every row in priority order (dense train eager + fla, serving, dense train compiled,
#             template, medium ...) until the time budget is spent; the rest are recorded as skipped
#   dense     dense shape, training: eager and compiled, ours and fla (5 compilations)
#   medium    medium preset, training: eager and compiled, ours and fla
#   serve     prefill and decode (eager and CUDA graph), both shapes, ours and fla (no compilation)
#   template  the LanguageModel step (Lightning, bf16-mixed, compiled) vs a hand-written compiled step
#   eager     training eager + prefill/decode, both shapes (no compilation; the quickest full picture)
#
# Wheels in .whl/ (fla-core 0.6.0 for the fla peer row and fla's KDA kernels; jsonargparse for the
# command line) are installed under /tmp/site. The extension is built unless a built one is newer than
# csrc/. Everything ends within E2E_TOTAL_S seconds (default 530); the JSON (rewritten after every row)
# and the log are copied to $OUT, and benchmarks/results/ holds the JSON too.
set -uo pipefail
PART=${1:-all}
TOTAL=${E2E_TOTAL_S:-530}
T0=$(date +%s)
OUT=${OUT:-/tmp/e2e_out}
mkdir -p "$OUT" benchmarks/results
LOG="$OUT/e2e_${PART}.log"
case "$PART" in
  all)      ARGS=() ;;
  dense)    ARGS=(--shapes '[dense]' --kinds '[train]' --tag dense) ;;
  medium)   ARGS=(--shapes '[medium]' --kinds '[train]' --tag medium) ;;
  serve)    ARGS=(--kinds '[prefill,decode]' --tag serve) ;;
  template) ARGS=(--shapes '[dense]' --kinds '[template]' --tag template) ;;
  eager)    ARGS=(--variants '[eager]' --kinds '[train,prefill,decode]' --tag eager) ;;
  *) echo "unknown PART '$PART' (all | dense | medium | serve | template | eager)"; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
# compiled kernels stay in the working tree (ignored): a warm machine reuses them on the next call
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton"
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }

main() {
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || echo "WARNING: wheels in .whl/ did not install"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for mod in ("fla.ops.attnres", "fla.ops.kda", "jsonargparse", "lightning"):
    try:
        importlib.import_module(mod)
        print("import", mod, "ok")
    except Exception as exc:
        print("import", mod, "FAILED:", type(exc).__name__, str(exc)[:200])
EOF

so=$(ls attnres/_C*.so 2>/dev/null | head -1)
if [[ -n "$so" && -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ]]; then
  echo "attnres._C is up to date: $so"
else
  echo "building attnres._C (left: $(left) s)"
  ATTNRES_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 270 \
    python3 -m pip install -q --no-build-isolation --no-deps -e . \
    || echo "WARNING: the build failed; the depth-attention ops run the PyTorch reference path"
fi
python3 -c "from attnres import ops; print('depth ops on cuda:', ops.backend('cuda'), ops.extension_error or '')"

BUDGET=$(( $(left) - 45 ))  # the benchmark stops starting rows here; timeout is the hard stop
echo "benchmark: part $PART, budget $BUDGET s"
timeout --signal=INT --kill-after=10 $(( $(left) - 15 )) \
  python3 benchmarks/bench_e2e.py ${ARGS[@]+"${ARGS[@]}"} --budget_s "$BUDGET"
echo "exit status $? (124: timed out; the JSON keeps every row finished before)"
cp -v benchmarks/results/e2e_*.json "$OUT"/ 2>/dev/null || echo "no JSON written"
echo "done in $(( $(date +%s) - T0 )) s"
}

main 2>&1 | tee "$LOG"
