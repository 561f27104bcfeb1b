#!/usr/bin/env bash
# Build llama.cpp's llama-server (and llama-quantize, llama-bench) from the llama-cpp-python source
# distribution, the one way llama.cpp's source reaches these machines (the package index only).
# Not part of CI: the peer benchmark (benchmarks/llama_cpp_peer.py) and the GGUF export's converter
# use it. About 10 minutes on 2 cores; a finished build is reused.
#
#   bash benchmarks/build_llama_cpp.sh                # -> runs/llama.cpp/src (source), runs/llama.cpp/build/bin
#   SOURCE_ONLY=1 bash benchmarks/build_llama_cpp.sh  # the source only (the GGUF converter), seconds
#   LLAMA_AMX=off bash benchmarks/build_llama_cpp.sh  # -> runs/llama.cpp/build-noamx/bin: this CPU's flags but AMX
#
# LLAMA_AMX=off: on a VM that reports AMX but does not let a process use its tiles (llama-server dies with
# SIGILL at `tilezero` in ggml_backend_amx_mul_mat), build for this CPU's other flags (AVX-512, VNNI, BF16) and
# point the benchmarks at it: LLAMA_CPP_BIN=runs/llama.cpp/build-noamx/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST=runs/llama.cpp
mkdir -p "$DEST"
if [ ! -d "$DEST/src" ]; then
  PIP=.venv/bin/pip; [ -x "$PIP" ] || PIP="python3 -m pip"
  $PIP download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$DEST/sdist"
  tar xzf "$DEST/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/sdist"
  mv "$DEST/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src"
fi
if [ -n "${SOURCE_ONLY:-}" ]; then  # the converter is Python: the GGUF export needs no build
  exit 0
fi
BUILD="$DEST/build"
ISA=(-DGGML_NATIVE=ON)
if [ "${LLAMA_AMX:-on}" = off ]; then
  BUILD="$DEST/build-noamx"
  flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
  ISA=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
    avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    [[ "$flags" == *" ${pair%%:*} "* ]] && ISA+=("-DGGML_${pair##*:}=ON")
  done
fi
if [ ! -x "$BUILD/bin/llama-server" ]; then
  cmake -S "$DEST/src" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    "${ISA[@]}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  cmake --build "$BUILD" -j "${JOBS:-2}" --target llama-server llama-quantize llama-bench
fi
"$BUILD/bin/llama-server" --version 2>&1 | tail -2
