#!/usr/bin/env bash
# Set up (or refresh) the environment, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# Two pytest workers on two cores: one math thread each avoids OpenMP oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
