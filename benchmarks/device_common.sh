# Shared by the one-call device scripts (source it from the repository root): the carried wheels and
# the CUDA build. The device machine has no network: pure-Python wheels the image lacks travel in .whl/.
# Sourcing it also sets unbuffered Python output and creates $OUT (default /tmp/attnres_out).
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/attnres_out}
mkdir -p "$OUT"

# install_wheels: install .whl/*.whl under /tmp/site and put it on PYTHONPATH (a warning if none).
install_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || echo "WARNING: wheels in .whl/ did not install"
  else
    echo "WARNING: no .whl/ (carry it): jsonargparse and fla are needed"
  fi
  # fast-attnres (a benchmark peer) installs a package named attnres too: into a directory of its own,
  # which the benchmarks load as fast_attnres (attnres/bench/peers.py); carry its wheel in .whl_peers/
  if compgen -G ".whl_peers/fast_attnres-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fast_attnres .whl_peers/fast_attnres-*.whl \
      && export ATTNRES_FAST_ATTNRES_DIR=/tmp/fast_attnres
  fi
}

# seed_triton_cache: point Triton's cache at .cache/triton (carried between calls: its *.autotune.json files)
# and, without carried autotune results there, start from the shipped ones (fla's KDA kernels; Triton
# ignores entries whose kernel or version changed)
seed_triton_cache() {
  export TRITON_CACHE_DIR="$PWD/.cache/triton"
  if [[ -z $(find .cache/triton -name '*.autotune.json' -print -quit 2>/dev/null) && -f lightning_modules/autotune/kda_sm90.tgz ]]; then
    mkdir -p .cache && tar xzf lightning_modules/autotune/kda_sm90.tgz -C .cache \
      && echo "seeded .cache/triton from lightning_modules/autotune/kda_sm90.tgz"
  fi
  return 0
}

# extension_carried_or_wheel: put attnres._C in place: from .devbuild/ when a previous call built it for
# this csrc/ (its md5 sums match), else built the way users build it, `pip wheel --no-build-isolation`
# (the CUDA kernels for the visible GPU), installed into /tmp/inst, `attnres info` run there, and the .so
# returned xz-compressed in $OUT with _build_info.json and sums (carry them back as .devbuild/). Sets
# fresh=1 after a fresh build; returns non-zero when the build fails.
extension_carried_or_wheel() {
  local sums
  sums=$(cat csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h setup.py | md5sum | cut -c1-12)
  if [[ -f .devbuild/sums && $(cat .devbuild/sums) == "$sums" ]] && compgen -G ".devbuild/_C*.so*" >/dev/null; then
    if [[ -f .devbuild/_C.abi3.so.xz ]]; then xz -dc .devbuild/_C.abi3.so.xz >attnres/_C.abi3.so; else cp .devbuild/_C*.so attnres/; fi
    cp .devbuild/_build_info.json attnres/ && echo "extension: carried build $sums"
    return 0
  fi
  fresh=1
  local t0=$(date +%s)
  echo "extension: pip wheel --no-build-isolation (CUDA for the visible GPU)"
  rm -rf /tmp/wh /tmp/inst
  MAX_JOBS=${MAX_JOBS:-16} timeout 330 python3 -m pip wheel -v --no-build-isolation --no-deps . -w /tmp/wh \
    >"$OUT/build.log" 2>&1 || { echo "build FAILED"; tail -30 "$OUT/build.log"; return 1; }
  grep -m1 "attnres setup:" "$OUT/build.log"
  python3 -m pip install -q --no-deps --target /tmp/inst /tmp/wh/attnres-*.whl
  (cd /tmp && PYTHONPATH=/tmp/inst:${PYTHONPATH:-} python3 -m attnres info)
  cp /tmp/inst/attnres/_C*.so /tmp/inst/attnres/_build_info.json attnres/
  # the .so is over the 16 MiB a returned file may have: xz (~4.5x) brings it back, to carry as .devbuild/
  xz -T0 -6 -c /tmp/inst/attnres/_C*.so >"$OUT/_C.abi3.so.xz" && cp /tmp/inst/attnres/_build_info.json "$OUT/" \
    && echo "$sums" >"$OUT/sums"
  rm -f "$OUT/build.log"
  echo "built in $(( $(date +%s) - t0 )) s"
}

# audit_run SPEC TIMEOUT_S: one run of benchmarks/study/audit.py, SPEC = model:arch:residual:seed[:ARGS], cut
# at TIMEOUT_S (SIGINT: a cut run writes its validations so far, status "cut"); ARGS: more audit.py
# arguments, comma-separated (s:reference:plain:0:--init,gpt2,--tag,gpt2init); AUDIT_DATA=pk: on the
# package corpus (.cache/corpus), run id tagged pk (unless ARGS gives a --tag). The log goes to
# $OUT/logs/audit_<SPEC with : and , as _>.log.
audit_run() {
  local model arch residual seed extra data=() log
  IFS=: read -r model arch residual seed extra <<<"$1"
  if [[ ${AUDIT_DATA:-} == pk ]]; then
    data=(--data.corpus shards --data.shards_dir .cache/corpus/shards --data.tokenizer .cache/corpus/bpe8192.json
          --tag pk)
  fi
  [[ -n $extra ]] && IFS=, read -r -a extra <<<"$extra" || extra=()
  log=${1//:/_}
  mkdir -p "$OUT/logs"
  timeout --signal=INT "$2" python3 -m benchmarks.study.audit --model "$model" --arch "$arch" \
    --residual "$residual" --seed "$seed" "${data[@]}" "${extra[@]}" >"$OUT/logs/audit_${log//,/_}.log" 2>&1
}

# gpu_tests TOTAL_S EACH_S "GROUP;GROUP;...": the GPU tests, each GROUP (pytest arguments, no quoting) in a
# pytest process of its own, within what is left of TOTAL_S: a test stuck in a driver call ignores
# pytest-timeout's SIGALRM and timeout's SIGTERM (session 18), so --kill-after ends its process and only its
# group is lost (session 19: one stuck test cost the rest of a 260 s run). Past EACH_S a test fails
# (pytest-timeout, where installed) and faulthandler prints every thread's stack into the log. Verbose
# output of all groups in $OUT/tests_gpu.log; one line per group, then the failures.
gpu_tests() {
  local total=$1 each=$2 t0 left group rc log summary extra=() groups=()
  t0=$(date +%s)
  python3 -c "import pytest_timeout" 2>/dev/null && extra=(--timeout "$each")
  IFS=';' read -r -a groups <<<"$3"
  : >"$OUT/tests_gpu.log"
  for group in "${groups[@]}"; do
    left=$(( total - ($(date +%s) - t0) ))
    if (( left < 15 )); then echo "GPU tests [$group]: not run (no time left)"; continue; fi
    log=$(mktemp)
    # shellcheck disable=SC2086  # a group is word-split into its pytest arguments on purpose
    timeout --kill-after=10 "$left" python3 -m pytest -v -p no:logging -p no:cacheprovider -rfE --durations 8 \
      -o faulthandler_timeout="$each" "${extra[@]}" $group >"$log" 2>&1
    rc=$?
    # pytest's own summary line ("145 passed, 4 warnings in 19.56s"; with -q there are no PASSED lines to
    # count); a run cut before it: the verbose PASSED / FAILED lines so far
    summary=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)
    [[ -n $summary ]] || summary="$(grep -c ' PASSED' "$log") passed, $(grep -c ' FAILED' "$log") failed so far"
    echo "GPU tests [$group]: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (cut)'), $summary," \
      "$(( $(date +%s) - t0 )) s so far"
    cat "$log" >>"$OUT/tests_gpu.log" && rm -f "$log"
  done
  grep -E "^(FAILED|ERROR)" "$OUT/tests_gpu.log" | sort -u | head -20
  return 0
}

# unpack_xz_shards: carried corpora travel with their token shards xz-compressed (a call carries at most
# 64 MiB; the package corpus's training shard is 81 MB, 28 MB as xz): .cache/*/shards/*.bin.xz -> *.bin.
unpack_xz_shards() {
  local f
  for f in .cache/*/shards/*.bin.xz; do
    [[ -f $f && ! -f ${f%.xz} ]] && xz -T0 -dc "$f" >"${f%.xz}.tmp" && mv "${f%.xz}.tmp" "${f%.xz}"
  done
  return 0
}

# build_extension [TIMEOUT_S]: build attnres._C with the CUDA kernels, unless a build newer than every
# file of csrc/ and setup.py is already there (a warm machine keeps it). Returns the build's status.
build_extension() {
  local so
  so=$(ls attnres/_C*.so 2>/dev/null | head -1)
  if [[ -n "$so" && -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ]]; then
    echo "attnres._C is up to date: $so"
    return 0
  fi
  echo "building attnres._C with CUDA (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  ATTNRES_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} timeout "${1:-300}" \
    python3 -m pip install -q --no-build-isolation --no-deps -e .
}
