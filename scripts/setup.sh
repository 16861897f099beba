#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (CPU torch where the machine offers it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A local CPU wheel is preferred where pip's find-links offer one; otherwise the registry's default.
  .venv/bin/pip install -q "torch==2.13.0" 2>/dev/null || .venv/bin/pip install -q torch
fi
.venv/bin/pip install -q -e ".[dev]"
