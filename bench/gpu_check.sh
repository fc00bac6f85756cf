#!/usr/bin/env bash
# The GPU check, on a machine with a GPU and a preinstalled torch (no internet,
# no venv): build in place for the visible GPU, run the suite on CUDA (the
# emulated CUDA tests run in CI instead), compute-sanitizer's memcheck,
# racecheck, synccheck and initcheck on a workload that reaches every kernel
# (bench/sanitizer_case.py), then the GPU benchmark.
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
python3 -m pytest -q tests --ignore=tests/test_cuda_emulated.py 2>&1 | tee "$OUT/tests.log" | tail -15 || status=1
for tool in memcheck racecheck synccheck initcheck; do
  extra=""
  [ "$tool" = racecheck ] && extra="--racecheck-report all"
  compute-sanitizer --tool "$tool" $extra --error-exitcode 1 python3 bench/sanitizer_case.py \
    > "$OUT/$tool.log" 2>&1 || status=1
  echo "== $tool"; tail -3 "$OUT/$tool.log"
done
python3 bench/bench.py ${BENCH_ARGS:-} --out "$OUT/bench.csv" > "$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
exit $status
