#!/usr/bin/env bash
# Set up (CPU torch + tttlm with its test extras) and run the whole test suite, on two
# pytest-xdist workers by default (TTTLM_TEST_WORKERS; 0 runs in this process alone): the
# suite's time is mostly single-threaded compiles and tiny models, so two workers on two
# cores take about 0.65 of one's time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh" test
cd "$root"
python -m pytest tests -n "${TTTLM_TEST_WORKERS:-2}" "$@"
