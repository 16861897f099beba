#!/usr/bin/env bash
# The GPU benchmark session, on a machine with one CUDA GPU and PyTorch + transformers installed
# (interleaf is used from the source tree; the GPU tests also need diffusers and openai, which the
# device tool's machine lacks: carry their wheels). Each benchmark compares with its peer in the same run.
#   OUT=results bash benchmarks/run_gpu.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-.bench/gpu}"
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
BENCHES="${BENCHES:-generation mono_ttft train train_loop eval serve}"
# the CUDA paths' tests first (InternVL, Mono-InternVL, the server, LCL): skipped without a GPU in CI
"$PY" -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -n 5
run() {  # run NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  case " $BENCHES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name"
  timeout "$limit" "$PY" "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | tail -n 40
}
run generation "${GEN_LIMIT:-240}" benchmarks/bench_generation.py --device cuda ${GEN_ARGS:---quick --presets tiny,internvl2-1b}
run mono_ttft "${MONO_LIMIT:-150}" benchmarks/bench_mono_ttft.py --device cuda --quick
run train "${TRAIN_LIMIT:-300}" benchmarks/bench_train.py --device cuda --quick
run train_loop "${TRAIN_LOOP_LIMIT:-300}" benchmarks/bench_train_loop.py --device cuda --preset internvl2-1b --compile
run eval "${EVAL_LIMIT:-150}" benchmarks/bench_eval.py --device cuda --quick
# no transformers serve peer there: it needs fastapi, uvicorn, pydantic and openai
run serve "${SERVE_LIMIT:-170}" benchmarks/bench_serve.py --device cuda --dtype bfloat16 --peer none
