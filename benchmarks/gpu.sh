#!/usr/bin/env bash
# The GPU checks behind the README's GPU tables, in one script: the parts named as
# arguments, in order (autoencoder, autotune_off, compile, digits, memory, tests), each under a
# time limit,
# on a machine whose Python already has jax with CUDA, optax, chex, scikit-learn,
# matplotlib and pytest-xdist. Logs and figures go to $OUT (default gpu-results/).
#
#     benchmarks/gpu.sh autoencoder tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

for part in "$@"; do
  case $part in
    autoencoder)
      timeout "${AUTOENCODER_SECONDS:-240}" python3 benchmarks/autoencoder.py --batch 512 \
        --adam-steps 2000 --ngd-steps 2000 --max-seconds "${NGD_SECONDS:-30}" \
        ${AUTOENCODER_ONLY:+--only "$AUTOENCODER_ONLY"} 2>&1 | tee "$OUT/autoencoder.txt"
      cp benchmarks/results/autoencoder_*.png "$OUT/" 2>/dev/null ;;
    autotune_off)  # the compile time of one row without XLA's GEMM autotuning
      XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "${AUTOTUNE_SECONDS:-90}" python3 \
        benchmarks/autoencoder.py --batch 512 --adam-steps 200 --ngd-steps 2000 \
        --max-seconds 25 --only "refresh every step" 2>&1 | tee "$OUT/autotune_off.txt" ;;
    compile)  # each row's compilation in a fresh process, with and without autotuning
      timeout "${COMPILE_SECONDS:-300}" python3 benchmarks/compile_times.py --batch 512 \
        ${COMPILE_ONLY:+--only "$COMPILE_ONLY"} 2>&1 | tee "$OUT/compile.txt"
      XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "${COMPILE_SECONDS:-300}" python3 \
        benchmarks/compile_times.py --batch 512 ${COMPILE_ONLY:+--only "$COMPILE_ONLY"} \
        2>&1 | tee "$OUT/compile_autotune_off.txt" ;;
    memory)  # the memory guard's estimates against XLA's on this backend
      timeout "${MEMORY_SECONDS:-120}" python3 -m pytest -n 4 -p no:benchmark -q -rf \
        --tb=line ${MEMORY_ONLY:+-k "$MEMORY_ONLY"} tests/test_memory.py 2>&1 \
        | tee "$OUT/memory.txt" | tail -20 ;;
    digits)
      timeout "${DIGITS_SECONDS:-150}" python3 benchmarks/digits_mlp.py 2>&1 | tee "$OUT/digits.txt" ;;
    tests)
      timeout "${TEST_SECONDS:-200}" python3 -m pytest -n 8 -p no:benchmark -v -rfE \
        --durations=10 >"$OUT/tests.txt" 2>&1
      echo "pytest exit: $?"
      grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.txt" | tail -25 ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
