#!/usr/bin/env bash
# Install expertpred and its dependencies on a CPU machine (editable, from this checkout).
#   bash install.sh          # the package
#   bash install.sh --dev    # + test tools (pytest, ruff, pandas, duckdb, datasets)
# llama-cpp-python is compiled from source by pip; CMAKE_ARGS below skip the parts of
# llama.cpp we never load (multimodal mtmd, tools, server, examples, tests) — see README.
# constraints.txt pins torch to the CPU wheel so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extra}"
