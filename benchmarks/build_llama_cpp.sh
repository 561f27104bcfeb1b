#!/usr/bin/env bash
# Build llama.cpp's llama-server (and llama-quantize, llama-bench) from the llama-cpp-python source
# distribution, the one way llama.cpp's source reaches these machines (the package index only).
# Not part of CI: the peer benchmark (benchmarks/llama_cpp_peer.py) and the GGUF export's converter
# use it. About 10 minutes on 2 cores; a finished build is reused.
#
#   bash benchmarks/build_llama_cpp.sh                # -> runs/llama.cpp/src (source), runs/llama.cpp/build/bin
#   SOURCE_ONLY=1 bash benchmarks/build_llama_cpp.sh  # the source only (the GGUF converter), seconds
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
if [ ! -x "$DEST/build/bin/llama-server" ]; then
  cmake -S "$DEST/src" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  cmake --build "$DEST/build" -j "${JOBS:-2}" --target llama-server llama-quantize llama-bench
fi
"$DEST/build/bin/llama-server" --version 2>&1 | tail -2
