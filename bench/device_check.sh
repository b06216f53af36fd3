#!/usr/bin/env bash
# The GPU checks of the llama.cpp hook's device path (issue 21), on a fresh device machine (one
# H200, no network), in about 10 minutes: builds llama-cpp-python 0.3.36 with CUDA for sm_90 and
# saehook with CUDA for sm_90 (in parallel), then runs tests/test_llama_cuda.py and the GPU test
# of tests/test_llama.py, bench/bench_llama_cuda.py (the overhead per generated token against
# the W_enc / bandwidth bound), tests/test_cuda.py and a short bench/bench_cuda.py. Every step
# logs to its own file, has a time limit inside the overall budget, and a failed step does not
# stop the next ones. Results under $OUT (few files: the device tool returns at most 8):
#   summary.txt        one line per step (status, seconds) and the tail of each step's log
#   device_check.log   this script's trace (set -x) and output
#   logs.tar.gz        every step's full log, the benchmarks' JSON, the tests' JUnit XML
#
# On the development machine first: bash bench/device_carry.sh (makes .device-carry/: the slim
# llama-cpp-python sdist and two wheels), then run with carry [".device-carry"]:
#     bash bench/device_check.sh
# Environment: OUT (default ./device_out), BUDGET_S (default 570), PYTHON (default python3),
# LLAMA_CPP_SDIST (a .tar.gz or source dir; default .device-carry/, pip's cache, /tmp/lcp),
# LLAMA_CPP_WHEEL (a CUDA wheel built earlier: installed instead of building),
# DEVICE_CHECK_SKIP (space-separated step names to skip, e.g. for a dry run without a GPU).
set -u
set -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/saehook-device-check}
LOGS=$WORK/logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
exec > >(tee -a "$OUT/device_check.log") 2>&1
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
START=$(date +%s)
CARRY=$ROOT/.device-carry
SITE=$WORK/site          # carried wheels
SITE_LLAMA=$WORK/site-llama
SITE_SAEHOOK=$WORK/site-saehook
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONUNBUFFERED=1
SUMMARY=$WORK/summary.txt
: >"$SUMMARY"
set -x

ts() { date -u +%H:%M:%S; }
left() { echo $((START + BUDGET_S - $(date +%s))); }

# Copies what we have to $OUT (after every step, so a cut-off run still returns its logs).
publish() {
  {
    echo "device_check $(date -u +%FT%TZ), budget ${BUDGET_S}s, used $(($(date +%s) - START))s"
    cat "$SUMMARY"
    for f in "$LOGS"/*.log; do
      [[ -e "$f" ]] || continue
      echo
      echo "==== $(basename "$f") (last 40 lines)"
      tail -n 40 "$f"
    done
  } >"$OUT/summary.txt"
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs 2>/dev/null || true
}

# step NAME MAX_SECONDS COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, at most
# MAX_SECONDS and never past the budget; records ok / FAILED rc / TIMEOUT / skipped.
step() {
  local name=$1 max=$2
  shift 2
  local budget
  budget=$(left)
  if [[ " ${DEVICE_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "$(ts) $name: skipped (DEVICE_CHECK_SKIP)" | tee -a "$SUMMARY"
    return 0
  fi
  if ((budget < 15)); then
    echo "$(ts) $name: skipped (no time left in the ${BUDGET_S}s budget)" | tee -a "$SUMMARY"
    return 0
  fi
  ((max > budget - 5)) && max=$((budget - 5))
  local t0 rc
  t0=$(date +%s)
  echo "$(ts) >>> $name (limit ${max}s)"
  # timeout runs the step (a function exported below) in its own process group and, past the
  # limit, ends the whole group (the builds' compilers too).
  timeout -k 10 "$max" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) status
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${dt}s (limit ${max}s)" ;;
    5) status="no tests ran (pytest rc=5: everything skipped or deselected, see the log)" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  echo "$(ts) $name: $status (${dt}s)" | tee -a "$SUMMARY"
  tail -n 5 "$LOGS/$name.log"
  publish
  return 0
}

env_info() {
  nvidia-smi || echo "no nvidia-smi"
  nvcc --version || echo "no nvcc"
  "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  lscpu | grep -i "model name\|flags" | cut -c1-400 || true
  cmake --version | head -n1
  ninja --version
  nproc
  free -g
  git -C "$ROOT" log --oneline -n 3 || true
  ls -la "$CARRY" "$CARRY/wheels" || echo "no .device-carry (run bench/device_carry.sh on the development machine)"
}

install_wheels() {
  mkdir -p "$SITE"
  ls "$CARRY"/wheels/*.whl || { echo "no carried wheels in $CARRY/wheels"; return 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
}

find_sdist() {
  local c
  for c in "${LLAMA_CPP_SDIST:-}" "$CARRY"/llama_cpp_python-0.3.36*.tar.gz \
      $(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" /tmp/lcp -name 'llama_cpp_python-0.3.36.tar.gz' 2>/dev/null); do
    [[ -n "$c" && -e "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

build_llama() {
  mkdir -p "$SITE_LLAMA"
  if [[ -n "${LLAMA_CPP_WHEEL:-}" ]]; then
    "$PYTHON" -m pip install --no-index --no-deps --target "$SITE_LLAMA" "$LLAMA_CPP_WHEEL"
    return
  fi
  local sdist src
  sdist=$(find_sdist) || { echo "no llama-cpp-python 0.3.36 source: run bench/device_carry.sh and carry .device-carry"; return 1; }
  echo "source: $sdist"
  if [[ -d "$sdist" ]]; then
    src=$sdist
  else
    rm -rf "$WORK/llama-src"
    mkdir -p "$WORK/llama-src"
    tar -xzf "$sdist" -C "$WORK/llama-src" || return 1
    src=$(echo "$WORK"/llama-src/llama_cpp_python-*)
  fi
  # ggml-cuda links cuBLAS: where the toolkit beside nvcc has none, use the pip package
  # nvidia-cublas of the image's python (headers and libcublas.so.13).
  local extra="" inc nv
  inc=$(dirname "$(command -v nvcc)")/../include
  if [[ ! -e "$inc/cublas_v2.h" ]]; then
    nv=$("$PYTHON" -c 'import nvidia.cublas as m; print(list(m.__path__)[0])' 2>/dev/null) || nv=""
    if [[ -n "$nv" && -e "$nv/include/cublas_v2.h" ]]; then
      echo "cuBLAS from $nv"
      extra="-DCUDA_cublas_LIBRARY=$(find "$nv/lib" -name 'libcublas.so.*' | head -n1)"
      extra="$extra -DCUDA_cublasLt_LIBRARY=$(find "$nv/lib" -name 'libcublasLt.so.*' | head -n1)"
      export CXXFLAGS="-I$nv/include" CUDAFLAGS="-I$nv/include"
      echo "$nv/lib" >"$WORK/ld_path"
    else
      echo "no cuBLAS headers beside nvcc ($inc) nor in the python package nvidia-cublas: ggml-cuda cannot link"
    fi
  fi
  # sm_90 only; no flash-attention kernels (their template instances are most of the build
  # time; llama.cpp then computes attention without them); no mtmd (llama_cpp imports it only
  # for multimodal models); the CPU backend for AVX2 without -march=native, so that it has no
  # AMX code whatever the host (the AMX matrix product that segfaults on Sapphire Rapids hosts,
  # ggml-org/llama.cpp#20824: see README, GPU section).
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $extra" \
    "$PYTHON" -m pip install -v --no-build-isolation --no-index --no-deps --no-cache-dir --target "$SITE_LLAMA" \
    -Cbuild-dir="$WORK/llama-build" "$src"
}

build_saehook() {
  mkdir -p "$SITE_SAEHOOK"
  "$PYTHON" -m pip install -v --no-build-isolation --no-index --no-deps --no-cache-dir --target "$SITE_SAEHOOK" \
    -Ccmake.define.SAEHOOK_CUDA=ON -Ccmake.define.SAEHOOK_CUDA_ARCHS=90 -Ccmake.define.SAEHOOK_LLAMA_EXAMPLE=OFF \
    -Cbuild-dir="$WORK/saehook-build" "$ROOT"
}

builds() {  # both builds at once (16 cores): saehook in the background, llama.cpp in front
  build_saehook >"$LOGS/build_saehook.log" 2>&1 &
  local pid=$! rc_llama rc_sae
  build_llama
  rc_llama=$?
  wait "$pid"
  rc_sae=$?
  echo "build_llama rc=$rc_llama build_saehook rc=$rc_sae (its log: build_saehook.log)"
  return $((rc_llama != 0 || rc_sae != 0))
}

py() {  # the image's python with the built packages first (and cuBLAS's folder where it came from pip)
  local p="$SITE:$SITE_LLAMA" ld="${LD_LIBRARY_PATH:-}"
  [[ -d "$SITE_SAEHOOK/saehook" ]] && p="$SITE_SAEHOOK:$p"
  [[ -e "$WORK/ld_path" ]] && ld="$(cat "$WORK/ld_path")${ld:+:$ld}"
  PYTHONPATH="$p${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$ld" "$PYTHON" "$@"
}

import_check() {
  py - <<'EOF'
import saehook.llama  # first (llama.cpp's OpenMP threads)
import llama_cpp, saehook
from saehook import _core
print("llama_cpp", llama_cpp.__version__, llama_cpp.__file__, "gpu offload:", llama_cpp.llama_supports_gpu_offload())
print("llama.cpp system info:", llama_cpp.llama_print_system_info().decode(errors="replace"))
print("saehook", saehook.__file__, "cuda kernels:", _core.cuda_available())
import saehook.cuda
try:
    print(saehook.cuda.describe())
except RuntimeError as e:
    print("saehook.cuda.describe():", e)
raise SystemExit(0 if llama_cpp.llama_supports_gpu_offload() and _core.cuda_available() else 1)
EOF
}

pytest_run() {  # pytest_run NAME ARGS...: JUnit XML next to the logs
  local name=$1
  shift
  py -m pytest -p no:cacheprovider -rs -v --junitxml="$LOGS/$name.xml" "$@"
}

bench_llama() {
  py bench/bench_llama_cuda.py --cache "$WORK/models" --json "$LOGS/bench_llama_cuda.json"
}

bench_kernels() {
  py bench/bench_cuda.py --shapes 4096x65536 --batches 1,8,64 --k 100 \
    --dtypes f32,bf16 --reps 10 --json "$LOGS/bench_cuda.json"
}

export ROOT OUT WORK LOGS PYTHON CARRY SITE SITE_LLAMA SITE_SAEHOOK
export -f env_info install_wheels find_sdist build_llama build_saehook builds py import_check pytest_run \
  bench_llama bench_kernels

echo "$(ts) device_check in $ROOT, results in $OUT, budget ${BUDGET_S}s"
step env 30 env_info
step wheels 60 install_wheels
step builds 360 builds
step import 60 import_check
step test_llama_gpu 150 pytest_run test_llama_gpu tests/test_llama_cuda.py tests/test_llama.py -k "cuda or gpu or device"
step bench_llama_cuda 150 bench_llama
step test_cuda 150 pytest_run test_cuda tests/test_cuda.py
step bench_cuda 90 bench_kernels
set +x
publish
echo "$(ts) done in $(($(date +%s) - START))s"
cat "$SUMMARY"
