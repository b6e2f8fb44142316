#!/usr/bin/env bash
# Set up (CPU torch + tttlm with its test extras) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh" test
cd "$root"
python -m pytest tests "$@"
