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
