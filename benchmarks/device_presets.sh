#!/usr/bin/env bash
# The Kimi-Linear-style presets on one GPU, as ONE device command (carry .whl, and .devbuild/.cache when
# a previous call left them):
#
#     bash benchmarks/device_presets.sh SHAPES [VARIANTS] [MODES]
#
# SHAPES: a bench e2e shape list such as '[s,m]' or '[medium,small]'; VARIANTS default '[eager,compile]';
# MODES default '[standard,block]'. PRESETS_TESTS: the GPU tests to run, groups of pytest arguments separated
# by ';', each group its own pytest process (no quoted arguments: `--deselect ID`, not `-k "not x"`; default:
# the KDA/fla, documents and CUDA op tests, after a fresh build only; given, they run also with a carried
# build). PRESETS_PROFILE=false: no profiled step (the kineto parse of a `medium` step takes minutes);
# =kernels: the GPU kernels only (quick). PRESETS_IMPLS: the bench's --impls (default '[attnres]';
# '[attnres,fla-model]' with the shape kda-dense adds fla's KDAForCausalLM peer; attnres-packed adds
# packed-document rows). PRESETS_BATCH: every shape's training batch (the bench's --batch). Steps:
#   1. the extension: taken from .devbuild/ when a previous call built it for this csrc/ (its md5 sums
#      match), else built the way users build it, `pip wheel --no-build-isolation` (the CUDA kernels for
#      the visible GPU, no TORCH_CUDA_ARCH_LIST), installed into /tmp/inst, `attnres info` run there,
#      and the .so copied in place and, xz-compressed, into $OUT (carry it back as .devbuild/ next time);
#   2. (fresh build, or PRESETS_TESTS given) the GPU tests, verbose (the log shows how far a cut run got),
#      bounded by PRESETS_TEST_S (default 150 s) and each by PRESETS_TEST_EACH_S (default 90 s, pytest-timeout;
#      past it faulthandler also prints every thread's stack: where a stuck test is);
#   3. `attnres bench e2e` training rows for SHAPES, profiled (device time vs wall), within the time left;
#   4. Triton's autotune results (fla's KDA kernels) packed into $OUT/triton_autotune.tgz.
# Everything ends within PRESETS_TOTAL_S (default 540 s).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_common.sh"
SHAPES=${1:?usage: device_presets.sh SHAPES [VARIANTS] [MODES]}
VARIANTS=${2:-'[eager,compile]'}
MODES=${3:-'[standard,block]'}
TOTAL=${PRESETS_TOTAL_S:-540}
T0=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
seed_triton_cache  # (also sets TRITON_CACHE_DIR)

install_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
fresh=0
extension_carried_or_wheel || exit 1
python3 -c "from attnres import ops; print('depth ops on cuda:', ops.backend('cuda'))"
if (( fresh )) || [[ -n ${PRESETS_TESTS:-} ]]; then
  # the GPU tests of the KDA path (fla, document packing) first, then the CUDA op tests: one pytest
  # process per group (gpu_tests in device_common.sh), so a stuck test costs only its own group
  gpu_tests "${PRESETS_TEST_S:-150}" "${PRESETS_TEST_EACH_S:-90}" "${PRESETS_TESTS:-tests/gpu/test_documents_fla_gpu.py;\
tests/gpu/test_fla_model_gpu.py;tests/gpu/test_kda_fla_gpu.py;tests/test_ops_cuda.py}"
fi
budget=$(( $(left) - 60 ))
echo "=== bench e2e $SHAPES $MODES $VARIANTS: budget $budget s"
timeout --signal=INT --kill-after=10 $(( budget + 30 )) python3 -m lightning_modules bench e2e --tag "${PRESETS_TAG:-presets}" \
  --budget_s "$budget" --shapes "$SHAPES" --modes "$MODES" --kinds '[train]' --variants "$VARIANTS" \
  --impls "${PRESETS_IMPLS:-[attnres]}" --profile "${PRESETS_PROFILE:-true}" ${PRESETS_BATCH:+--batch "$PRESETS_BATCH"}
echo "=== bench exit $?"
cp benchmarks/results/e2e_*_"${PRESETS_TAG:-presets}".json "$OUT/" 2>/dev/null
(cd .cache && find triton -name '*.autotune.json' -print0 | tar czf "$OUT/triton_autotune.tgz" --null -T -)
echo "done in $(( $(date +%s) - T0 )) s"
