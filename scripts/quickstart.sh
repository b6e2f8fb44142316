#!/usr/bin/env bash
# Set up and run the main job: train a tiny TTT-E2E model and its SWA / full-attention baselines
# on the built-in books and write a report comparing their loss by token position.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh" plot
cd "$root"
tttlm quickstart --out "${1:-runs/quickstart}"
