#!/usr/bin/env bash
# Set up (or refresh) the environment, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
