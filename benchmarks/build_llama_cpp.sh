#!/usr/bin/env bash
# Build llama.cpp's llama-bench (CPU only) for `python -m benchmarks.decode`'s llama.cpp rows, outside the repo.
#
#   bash benchmarks/build_llama_cpp.sh [SDIST.tar.gz]
#
# Source: the llama-cpp-python sdist from PyPI (it vendors llama.cpp with convert_hf_to_gguf.py and gguf-py);
# given, or fetched with `pip download` (no other network access). Unpacked under $HISS_LLAMA_CPP_DIR
# (default ~/.cache/hiss/llama_cpp); only the llama-bench target is built (not the Python wheel, server,
# examples or tests). JOBS (default 1) parallel compile jobs at nice NICE (default 15): on a shared 2-core
# machine a -j1 build took 30 minutes (docs/benchmarks.md, decode notes).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${HISS_LLAMA_CPP_DIR:-$HOME/.cache/hiss/llama_cpp}"
JOBS="${JOBS:-1}"
NICE="${NICE:-15}"
mkdir -p "$DIR"

SDIST="${1:-}"
if [ -z "$SDIST" ]; then
    SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
    if [ ! -f "$SDIST" ]; then
        python -m pip download "llama-cpp-python==$VERSION" --no-binary llama-cpp-python --no-deps -d "$DIR"
    fi
fi
SRC="$DIR/$(basename "$SDIST" .tar.gz)/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tar xzf "$SDIST" -C "$DIR"
fi

cd "$SRC"
t0=$(date +%s)
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
nice -n "$NICE" cmake --build build --target llama-bench -j "$JOBS"
echo "built $SRC/build/bin/llama-bench in $(( $(date +%s) - t0 )) s"
