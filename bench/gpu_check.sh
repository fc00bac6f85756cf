#!/usr/bin/env bash
# The GPU check, on a machine with a GPU and a preinstalled torch (no internet,
# no venv): build in place for the visible GPU, run the whole suite on CUDA,
# compute-sanitizer memcheck on a small workload, then the GPU benchmark.
# Logs and CSVs go to OUTDIR.   Usage: bench/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export FSCE_CUDA=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
  tail -40 "$OUT/build.log"; exit 1; }
python3 -m pytest -q tests 2>&1 | tee "$OUT/tests.log" | tail -15 || status=1
compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitizer_case.py \
  > "$OUT/memcheck.log" 2>&1 || status=1
tail -5 "$OUT/memcheck.log"
python3 bench/bench.py ${BENCH_ARGS:-} --out "$OUT/bench.csv" > "$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
exit $status
