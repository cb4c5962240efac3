#!/usr/bin/env bash
# The standing GPU work in one go: both full specs (every rung, 3 seeds), the export and benchmark of the best
# models and of every rung (cost columns, trade-off figure), and `bench perf`, each step's wall time logged to results/gpu_tables.log.
#
#   BENCH_DATA=/path/to/data scripts/gpu_tables.sh [--quick-perf]
#
# Workers are chosen from the GPU's free memory (`bench run` without --workers); several small runs share the
# GPU.  Everything resumes: rerun the script after an interruption and finished runs are skipped.  Set
# BENCH_COMMIT when the checkout travels without its .git (see bench/files.py).
set -euo pipefail
cd "$(dirname "$0")/.."
log=results/gpu_tables.log
mkdir -p results
perf=(python -m bench perf --compile)
[[ "${1:-}" == "--quick-perf" ]] && perf+=(--quick)
step() {
  local t0=$SECONDS
  echo "$(date -u +%FT%TZ) start: $*" | tee -a "$log"
  "$@"
  echo "$(date -u +%FT%TZ) done in $((SECONDS - t0)) s: $*" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee -a "$log" || true
step python -m bench run ablations/mnist.yaml --no-progress
step python -m bench run ablations/warwick.yaml --no-progress
step python -m exporters.onnx best --int8 --retrain  # a run from git (no best.pt) trains again here
step python -m exporters.onnx rungs ablations/mnist.yaml --int8 --retrain    # every rung's cost; CUDA provider too
step python -m exporters.onnx rungs ablations/warwick.yaml --int8 --retrain
step "${perf[@]}"
