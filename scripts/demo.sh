#!/usr/bin/env bash
# Set up (or refresh) the environment and run the end-to-end demo on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/interleaf demo "$@"
