#!/usr/bin/env bash
# Creates .venv (if missing) with a CPU build of PyTorch unless one is already importable, and
# installs tttlm with the extras given as arguments (default: none). Sourced by the other scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TTTLM_VENV:-$root/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  # A plain `pip install torch` pulls a multi-GB CUDA build; the CPU build is enough here.
  # Users with a GPU install their own torch first (any version in pyproject's range).
  python -m pip install -q "torch==2.13.0" 2>/dev/null \
    || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if [ -n "$extras" ]; then
  python -m pip install -q -e "$root[$extras]"
else
  python -m pip install -q -e "$root"
fi
