#!/usr/bin/env bash
# Prepares, on the development machine, what bench/device_check.sh needs on a fresh device
# machine that cannot reach any registry: a slimmed llama-cpp-python 0.3.36 source tarball (the
# sdist without llama.cpp's models, docs, web UI and tests: under the device tool's 64 MiB) and
# the pure-Python wheels the device image lacks (gguf for the tests' GGUF writer, diskcache for
# llama_cpp). Writes them to .device-carry/ in the repository (ignored through .git/info/exclude)
# and prints the `carry` argument to give the device tool's run.
#
#     bash bench/device_carry.sh            # then: run(command="bash bench/device_check.sh", carry=[".device-carry"])
#
# The sdist comes from $LLAMA_CPP_SDIST, pip's cache, /tmp/lcp, or `pip download` (network).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dst="$here/.device-carry"
ver=0.3.36
mkdir -p "$dst/wheels"
common=$(git -C "$here" rev-parse --git-common-dir)
grep -qx '/.device-carry/' "$common/info/exclude" 2>/dev/null || echo '/.device-carry/' >>"$common/info/exclude"

sdist=${LLAMA_CPP_SDIST:-}
if [[ -z "$sdist" ]]; then
  sdist=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" /tmp/lcp -name "llama_cpp_python-$ver.tar.gz" 2>/dev/null | head -n1 || true)
fi
if [[ -z "$sdist" ]]; then
  python3 -m pip download --no-deps --no-binary=:all: "llama-cpp-python==$ver" -d /tmp/lcp
  sdist=/tmp/lcp/llama_cpp_python-$ver.tar.gz
fi
echo "sdist: $sdist"
tmp=$(mktemp -d)
tar -xzf "$sdist" -C "$tmp"
src="$tmp/llama_cpp_python-$ver"
v="$src/vendor/llama.cpp"
# Not part of the library build (llama.cpp as a subproject builds no tests, examples or tools;
# llama-cpp-python adds tools/mtmd only with LLAVA_BUILD, which device_check turns off).
rm -rf "$v"/models "$v"/docs "$v"/benches "$v"/tests "$v"/examples "$v"/tools/ui "$v"/tools/server \
  "$v"/gguf-py "$v"/conversion "$v"/ggml/src/ggml-{vulkan,opencl,sycl,hexagon,metal,et,cann,musa,webgpu,zdnn,openvino,virtgpu} \
  "$src"/docs "$src"/examples "$src"/tests
tar -C "$tmp" -czf "$dst/llama_cpp_python-$ver-slim.tar.gz" "llama_cpp_python-$ver"
rm -rf "$tmp"
# The device's python3 is 3.12 (KINDS.md); both wheels are pure Python.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$dst/wheels" gguf==0.19.0 diskcache==5.6.3
du -sh "$dst" "$dst"/* "$dst"/wheels/*
echo 'carry: [".device-carry"]'
